"""pathmonitor's Lightning layer: callbacks that log path quantities live during training.

Thin by design: they decide when to compute and where to log; the mathematics lives in the core
package `pathmonitor`, which does not import Lightning."""
from .base import MonitorError
from .bound_monitor import GeneralizationBoundMonitor
from .drift import PathMetricDrift
from .norm_monitor import PathNormMonitor
from .pruning import PathBudgetPruning
from .regularizer import PathNormRegularizer

__all__ = ["GeneralizationBoundMonitor", "MonitorError", "PathBudgetPruning", "PathMetricDrift", "PathNormMonitor",
           "PathNormRegularizer"]
