"""The generalization bound of the path-norm toolkit (MATH.md section 5).

    gap <= L_loss * ||Phi(theta)||_1 * 4 * C * B / sqrt(n)
    C       = sqrt( D*ln((3+2P)*K) + ln( (3+2P)/(1+P) * (d_in+1) * d_out ) )
    C_sharp = sqrt( D*ln 3 + M*ln K + ln((d_in+1) * d_out) )
The architecture constants D, K, P, M, d_in, d_out are derived from the captured graph.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .engine import Interpreter, Scaled
from .graph import OpKind, PathGraph, PathOp, capture, longest_path
from .layers import BATCH_NORMS
from .logmath import exp_or_inf
from .norms import log_path_norm, unwrapped, validated_input_shape
from .pools import AdaptivePool, WindowPool
from .sources import AbsoluteMagnitudes, MetaSource, ParameterEdges


@dataclass(frozen=True)
class GeneralizationBound:
    """value = loss_lipschitz * path_norm * first_part, first_part = 4*C*B/sqrt(n) (MATH.md section 5)."""

    value: float
    first_part: float
    path_norm: float
    depth: int
    max_pool_kernel: int
    max_pool_kinds: int
    max_pools_per_path: int
    d_in: int
    d_out: int
    log_value: float
    sharpened: bool


def _is_max_pool(op: PathOp) -> bool:
    return op.kind is OpKind.POOL and isinstance(op.pool, (WindowPool, AdaptivePool)) and op.pool.reduce == "max"


class _ShapeRecorder(Interpreter):
    """A shape-only (meta) pass that records the largest max-pool window and the output size."""

    largest_window = 1
    output_size = 0

    def _evaluate(self, op: PathOp, values: list[Any]) -> Any:
        if _is_max_pool(op):
            spatial = tuple(values[op.args[0].index].value.shape[2:])
            self.largest_window = max(self.largest_window, op.pool.largest_window(spatial))
        if op.kind is OpKind.OUTPUT:
            for ref in op.refs():
                held = values[ref.index]
                if isinstance(held, Scaled):
                    leaves = held.value if isinstance(held.value, (tuple, list)) else (held.value,)
                    self.output_size += sum(t.numel() for t in leaves)
        return super()._evaluate(op, values)


def architecture_constants(graph: PathGraph, model: nn.Module) -> dict[str, int]:
    """D, K, P, M, d_in, d_out of MATH.md section 5, read off the graph and one meta pass.

    P counts the distinct k of k-max-pooling neurons; PyTorch's max-pools are all k = 1."""
    recorder = _ShapeRecorder(graph, model, AbsoluteMagnitudes(ParameterEdges(MetaSource())), 1.0, False,
                              torch.device("meta"))
    recorder.run()

    def is_weight_layer(op: PathOp) -> int:
        return int(op.kind is OpKind.AFFINE and not isinstance(model.get_submodule(op.target), BATCH_NORMS))

    pools_per_path = longest_path(graph, lambda op: int(_is_max_pool(op)))
    return dict(depth=longest_path(graph, is_weight_layer), max_pool_kernel=recorder.largest_window,
                max_pool_kinds=int(pools_per_path > 0), max_pools_per_path=pools_per_path,
                d_in=math.prod(graph.input_shape), d_out=recorder.output_size)


def check_number(name: str, value: Any, *, integer: bool = False, minimum: float = 0.0, strict: bool = True) -> None:
    kind = numbers.Integral if integer else numbers.Real
    valid = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum)
    if not valid:
        relation = ">" if strict else ">="
        kind_name = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind_name} {relation} {minimum:g}, got {value!r}")


def generalization_bound(model: nn.Module, input_shape: Sequence[int], n_samples: int, input_bound: float,
                         loss_lipschitz: float = 1.0, sharpened: bool = False, *, depth: Optional[int] = None,
                         max_pool_kernel: Optional[int] = None, max_pool_kinds: Optional[int] = None,
                         max_pools_per_path: Optional[int] = None, d_in: Optional[int] = None,
                         d_out: Optional[int] = None) -> GeneralizationBound:
    """Bound on the generalization gap, L_loss * ||Phi(theta)||_1 * 4*C*B/sqrt(n) (MATH.md section 5).

    n_samples: training samples n; input_bound: B = max_i ||x_i||_inf over the (normalized) training
    inputs, used as max(B, 1). Every architecture constant is derived from the model and can be
    overridden."""
    model, shape = unwrapped(model), validated_input_shape(input_shape)
    check_number("n_samples", n_samples, integer=True)
    check_number("input_bound", input_bound)
    check_number("loss_lipschitz", loss_lipschitz)
    overrides = dict(depth=depth, max_pool_kernel=max_pool_kernel, max_pool_kinds=max_pool_kinds,
                     max_pools_per_path=max_pools_per_path, d_in=d_in, d_out=d_out)
    minimum = dict(depth=0, max_pool_kernel=1, max_pool_kinds=0, max_pools_per_path=0, d_in=1, d_out=1)
    for key, value in overrides.items():
        if value is not None:
            check_number(key, value, integer=True, minimum=minimum[key], strict=False)
    constants = architecture_constants(capture(model, shape), model)
    constants.update({key: value for key, value in overrides.items() if value is not None})
    with torch.no_grad():
        log_norm = float(log_path_norm(model, shape, 1.0))
    return assemble_bound(constants, log_norm, n_samples, input_bound, loss_lipschitz, sharpened)


def assemble_bound(constants: dict[str, int], log_norm: float, n_samples: int, input_bound: float,
                   loss_lipschitz: float = 1.0, sharpened: bool = False) -> GeneralizationBound:
    """L_loss * exp(log_norm) * 4*C*B/sqrt(n) from the architecture constants (MATH.md section 5)."""
    D, K, P, M = (constants[key] for key in ("depth", "max_pool_kernel", "max_pool_kinds", "max_pools_per_path"))
    n_in, n_out = constants["d_in"], constants["d_out"]
    if sharpened:
        c_squared = D * math.log(3) + M * math.log(K) + math.log((n_in + 1) * n_out)
    else:
        c_squared = D * math.log((3 + 2 * P) * K) + math.log((3 + 2 * P) / (1 + P) * (n_in + 1) * n_out)
    # bias paths enter like inputs of value 1, so B below 1 counts as 1 (conservative either way)
    first_part = 4 * math.sqrt(c_squared) * max(float(input_bound), 1.0) / math.sqrt(n_samples)
    log_value = math.log(loss_lipschitz * first_part) + log_norm
    return GeneralizationBound(value=exp_or_inf(log_value), first_part=first_part, path_norm=exp_or_inf(log_norm),
                               log_value=log_value, sharpened=sharpened, **constants)
