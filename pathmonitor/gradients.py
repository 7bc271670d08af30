"""Where a gradient must be added so that the next optimizer step uses it (DESIGN.md layer 4).

- plain parameters (one process, DDP after its all-reduce): `p.grad`;
- FSDP2: `p.grad` is a DTensor sharded like `p`, and so is the gradient handed in;
- DeepSpeed (ZeRO-1/2/3): the gradients live in the optimizer's fp32 partitions. They hold the gradient
  times the fp16 loss scale until the step, so an added gradient is multiplied by that scale too. Under
  ZeRO-3 every rank adds its own entries to its own partition (`safe_get_local_grad` /
  `safe_set_local_grad`, no communication: every rank holds the same full gradient); under ZeRO-1/2
  through `safe_get_full_grad` / `safe_set_full_grad` (an all-reduce per parameter).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .distributed import has_class_named, is_zero3_parameter, zero3_piece

GradientAdder = Callable[[str, nn.Parameter, Tensor], None]


def gradient_adder(trained: nn.Module, factor: float) -> GradientAdder:
    """A function add(name, parameter, gradient) that adds `factor * gradient` to the gradient of
    `parameter` the next optimizer step of `trained` (the model as the strategy wraps it) will use."""
    if has_class_named(trained, "DeepSpeedEngine"):
        return _deepspeed_adder(factor * float(getattr(trained.optimizer, "loss_scale", 1.0) or 1.0))

    def add(name: str, p: nn.Parameter, grad: Tensor) -> None:
        if p.grad is None:
            p.grad = (grad * factor).to(p.dtype)
        else:
            p.grad.add_(grad.to(p.grad.dtype), alpha=factor)

    return add


def _deepspeed_adder(factor: float) -> GradientAdder:
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad, safe_set_full_grad, safe_set_local_grad

    def add(name: str, p: nn.Parameter, grad: Tensor) -> None:
        zero3 = is_zero3_parameter(p)
        current = safe_get_local_grad(p) if zero3 else safe_get_full_grad(p)
        if current is None:
            raise RuntimeError(f"DeepSpeed holds no gradient for parameter {name!r} at the optimizer step: "
                               f"it is frozen or not handed to the optimizer")
        if zero3:
            safe_set_local_grad(p, current + (zero3_piece(p, grad) * factor).to(current.dtype))
        else:
            safe_set_full_grad(p, current + (grad * factor).to(current.dtype))

    return add
