"""Path-norms ||Phi(theta)||_q of a model, exact, in one pass of the |theta|^q network (MATH.md section 2)."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from .distributed import full_shape, has_class_named
from .engine import Scaled, evaluate, exact_values, is_precise, log_of
from .errors import PathComputationError, SupportReport, UnsupportedNode
from .graph import PathGraph, PerGraph, capture, check_graph
from .layers import tensor_names
from .sources import AbsoluteMagnitudes, MetaSource, ModuleSource, ParameterEdges, ParameterSource, submodule
from .tracer import compiled_original


class PathNormOverflowWarning(RuntimeWarning):
    """The path-norm exceeds the float64 range; its logarithm is still exact."""


def validated_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """`input_shape` as a tuple of positive ints (one input, without the batch dimension)."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a sequence of ints such as (3, 224, 224), got {input_shape!r}") from None
    if not shape or any(s <= 0 for s in shape) or any(int(s) != s for s in input_shape):
        raise ValueError(f"input_shape must be positive ints without the batch dimension, got {input_shape!r}")
    return shape


def validated_q(q: float) -> float:
    if isinstance(q, bool) or not (isinstance(q, (int, float)) and math.isfinite(q) and q >= 1):
        raise ValueError(f"q must be a finite number >= 1 (the exponent of the Lq path-norm), got {q!r}")
    return float(q)


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / DeepSpeedEngine / torch.compile wrappers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        wrapper = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
        if wrapper or has_class_named(model, "DeepSpeedEngine"):
            model = model.module
        elif compiled_original(model) is not None:
            model = compiled_original(model)
        else:
            return model


def sum_of_powers(graph: PathGraph, model: nn.Module, source: ParameterSource, q: float) -> Scaled:
    """sum_p |Phi_p(theta)|^q, exactly, as Scaled(value, log_scale) (MATH.md §2): a plain float64 pass,
    repeated with running log-scales when anything in it over- or underflows."""
    _, values = exact_values(graph, model, AbsoluteMagnitudes(ParameterEdges(source)), q, keep=False)
    return values[-1]


def norm_of(total: Scaled, q: float) -> Tensor:
    """||Phi||_q = total^(1/q) from the exact sum of powers: inf beyond float64, and 0 with a zero
    gradient (a subgradient: no path carries weight) when the sum is 0."""
    if float(total.value.detach()) == 0:
        return total.value * 0.0
    if _plain(total):
        return total.value if q == 1 else total.value ** (1.0 / q)
    return torch.exp(log_of(total, q) / q)


def _plain(total: Scaled) -> bool:
    """Whether the total came from a trusted plain float64 pass (no log-scale), read as it is."""
    return total.log_scale == 0 and is_precise(total.value)


def log_path_norm(model: nn.Module, input_shape: Sequence[int], q: float = 1.0) -> Tensor:
    """log ||Phi(theta)||_q, computed with running log-scales so that it never overflows (MATH.md §2)."""
    model, shape, q = unwrapped(model), validated_input_shape(input_shape), validated_q(q)
    magnitudes = AbsoluteMagnitudes(ParameterEdges(ModuleSource(model)))
    return log_of(evaluate(capture(model, shape), model, magnitudes, q, log_scaled=True), q) / q


def path_norm(model: nn.Module, input_shape: Sequence[int], q: float = 1.0) -> Tensor:
    """||Phi(theta)||_q = (sum of the outputs of the |theta|^q network on ones)^(1/q) (MATH.md §2).

    A 0-dim float64 tensor, differentiable with respect to the model's parameters when autograd is on.
    Batch-norm layers always use their running statistics. Returns inf, with a warning, only when the
    true value exceeds float64; `log_path_norm` gives its exact logarithm. A plain float64 pass, repeated
    with running log-scales when anything in it over- or underflows.
    """
    model, shape, q = unwrapped(model), validated_input_shape(input_shape), validated_q(q)
    total = sum_of_powers(capture(model, shape), model, ModuleSource(model), q)
    norm = norm_of(total, q)
    if math.isinf(float(norm.detach())):
        log_norm = float(log_of(total, q).detach()) / q
        warnings.warn(f"the L{q:g} path-norm is exp({log_norm:.6g}), beyond float64; returning inf. "
                      f"Use pathmonitor.log_path_norm for its exact logarithm.", PathNormOverflowWarning, stacklevel=2)
    return norm


def norm_and_log(graph: PathGraph, model: nn.Module, source: ParameterSource, q: float) -> tuple[float, float]:
    """(||Phi(theta)||_q, log ||Phi(theta)||_q) as floats, theta read from `source` (MATH.md §2), no autograd.

    The value is computed as `path_norm` computes it, so both agree to the last bit on the same weights."""
    with torch.no_grad():
        return norm_and_log_of(sum_of_powers(graph, model, source, q), q)


def norm_and_log_of(total: Scaled, q: float) -> tuple[float, float]:
    """(||Phi(theta)||_q, log ||Phi(theta)||_q) as floats from the exact sum of powers of a pass."""
    value = float(norm_of(total, q))
    if _plain(total):
        return value, math.log(value)
    return value, float(log_of(total, q)) / q


def check_support(model: nn.Module, input_shape: Sequence[int]) -> SupportReport:
    """Every operation of `model` outside the path model, and any failure on `input_shape` (MATH.md §1).

    Empty when the model is supported. Costs one symbolic trace and one shape-only (meta) pass.
    """
    model, shape = unwrapped(model), validated_input_shape(input_shape)
    report = check_graph(model, shape)
    if report:
        return report
    graph = capture(model, shape)
    shapes = _tensor_shapes(graph, model)
    if _FITTING_SHAPES.get(graph) == shapes:  # several monitors of one model check it once
        return report
    try:
        evaluate(graph, model, AbsoluteMagnitudes(ParameterEdges(MetaSource())), 1.0, log_scaled=False,
                 device=torch.device("meta"))
    except PathComputationError as error:
        return SupportReport((UnsupportedNode("<model>", type(model).__name__, str(error)),))
    _FITTING_SHAPES.set(graph, shapes)
    return report


# the shapes of the tensors a graph reads that its shape-only pass accepted
_FITTING_SHAPES: PerGraph[tuple] = PerGraph()


def _tensor_shapes(graph: PathGraph, model: nn.Module) -> tuple:
    """The full shape of every tensor the graph reads (None where a module has no such tensor)."""
    shapes = []
    for name in dict.fromkeys(graph.affine_modules()):
        module = submodule(model, name)
        tensors = (getattr(module, key, None) for key in tensor_names(module))
        shapes.append(tuple(None if t is None else tuple(full_shape(t)) for t in tensors))
    return tuple(shapes)
