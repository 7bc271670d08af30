"""Names and numbers shared by the callbacks and the audit command, without importing Lightning."""
from __future__ import annotations

import math

import torch
from torch import nn

from pathmonitor.norms import validated_input_shape


def exponent_tag(q: float) -> str:
    """'1' for q = 1.0, '1.5' for q = 1.5: integers in tag names where the exponent is integral."""
    return str(int(q)) if float(q).is_integer() else f"{q:g}"


def example_input_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of `module.example_input_array` without its batch dimension; ValueError saying why not."""
    example = getattr(module, "example_input_array", None)
    if isinstance(example, torch.Tensor) and example.dim() >= 2:
        return validated_input_shape(example.shape[1:])
    if example is None:
        raise ValueError(f"{type(module).__name__} has no example_input_array")
    raise ValueError(f"the example_input_array of {type(module).__name__} is a {type(example).__name__}, not one "
                     f"batched tensor (path quantities are defined for one input)")


def log10(log_value: float) -> float:
    return log_value / math.log(10)
