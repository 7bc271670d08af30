"""Errors and the support report shared by every layer of pathmonitor."""
from __future__ import annotations

from dataclasses import dataclass

_HOW_TO_PROCEED = (
    "Path quantities are defined for ReLU networks built from conv / linear / ReLU / pooling / "
    "batch-norm with running statistics / skips / concatenation (MATH.md section 1). "
    "Compute them on a supported sub-module instead, e.g. pm.path_norm(model.features, input_shape)."
)


@dataclass(frozen=True)
class UnsupportedNode:
    """One operation of a captured model that is not in the path model."""

    name: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}): {self.reason}"


class SupportReport(tuple):
    """Every unsupported operation of a model, in execution order; empty when the model is fine."""

    def __str__(self) -> str:
        if not self:
            return "supported"
        return "\n".join(f"  - {problem}" for problem in self)


class UnsupportedModelError(ValueError):
    """Raised when a model contains operations outside the path model; lists all of them."""

    def __init__(self, problems: SupportReport | tuple[UnsupportedNode, ...]):
        self.problems = SupportReport(problems)
        count = len(self.problems)
        super().__init__(
            f"{count} operation{'s' if count != 1 else ''} outside the path model:\n"
            f"{self.problems}\n{_HOW_TO_PROCEED}"
        )


class PathComputationError(RuntimeError):
    """Raised when evaluating the path network fails at one operation (usually a wrong input_shape)."""


class ParameterMismatchError(ValueError):
    """Raised when a second network (module or state dict) does not match the model's parameters."""


class IgnoredHookWarning(UserWarning):
    """Warned when a captured model has forward hooks or pre-hooks, which the path model does not include."""
