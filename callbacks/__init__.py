"""pathmonitor's Lightning layer: callbacks that log path quantities live during training.

Thin by design: they decide when to compute and where to log; the mathematics lives in the core
package `pathmonitor`, which does not import Lightning. The callbacks are imported on first use, so
that the audit command answers without loading Lightning."""
import importlib
from typing import Any

_HOMES = {"GeneralizationBoundMonitor": "bound_monitor", "MonitorError": "base", "PathBudgetPruning": "pruning",
          "PathMetricDrift": "drift", "PathNormMonitor": "norm_monitor", "PathNormRegularizer": "regularizer"}

__all__ = sorted(_HOMES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
