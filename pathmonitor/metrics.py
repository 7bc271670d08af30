"""Path-metrics ||Phi(theta) - Phi(theta')||_1 and the function-change certificates they give (MATH.md §3).

Theorem: if theta and theta' agree in sign coordinate-wise (zeros allowed), then for every input x,
||R_theta(x) - R_theta'(x)||_1 <= max(||x||_inf, 1) * ||Phi(theta) - Phi(theta')||_1.
Every quantity is computed in float64 with running log-scales, so deep networks never overflow.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .architecture import check_same, check_state_dict_keys
from .distributed import gathering_in_order
from .engine import exact_values, exact_walks
from .errors import IgnoredHookWarning, ParameterMismatchError, PathComputationError, UnsupportedModelError
from .graph import PathGraph, capture
from .layers import TRANSPOSED_CONVOLUTIONS
from .logmath import exp_or_inf, log_difference, log_sum
from .norms import norm_and_log_of, unwrapped, validated_input_shape
from .sources import (AbsoluteMagnitudes, EdgeMagnitudes, Edges, EdgeSource, Envelopes, ModuleSource,
                      ParameterEdges, ParameterSource, StateDictSource, TransformedSource,
                      common_dtype, magnitude, opposite_signs, paired_edges, submodule)

Kind = Literal["pruning", "same_sign", "general"]
Network = Union[nn.Module, Mapping[str, Tensor]]


@dataclass(frozen=True)
class PathMetric:
    """||Phi(theta) - Phi(theta')||_1, or an upper bound on it when `exact` is False.

    kind: "pruning" (one network is the other with entries zeroed or shrunk, signs kept: exact, two
    passes), "same_sign" (max/min envelope bound, three passes), "general" (sign split and triangle
    inequality, four passes). After the first, the passes a kind needs are evaluated together, in one
    walk of the graph. `relative` is value / ||Phi(theta)||_1, the form a budget uses.
    `value` is inf only when the true number exceeds float64; `log_value` is always exact."""

    value: float
    exact: bool
    kind: Kind
    log_value: float
    relative: float

    def __str__(self) -> str:
        relation = "=" if self.exact else "<="
        return f"path-metric {relation} {self.value:.6g} ({self.relative:.3g} of the path-norm; {self.kind})"


def _log_l1s(graph: PathGraph, model: nn.Module, networks: Sequence[EdgeMagnitudes]) -> list[float]:
    """log of the L1 path-norm of each network, evaluated together in one walk of the graph; every log
    of a metric is taken as `norm_and_log_of` takes it, so equal totals give equal logs, to the bit."""
    return [norm_and_log_of(values[-1], 1.0)[1] for _, values in exact_walks(graph, model, networks, 1.0, keep=False)]


def _between_zero_and(x: Tensor, y: Tensor) -> bool:
    """Whether every y_i lies between 0 and x_i (inclusive): sign(y_i) * sign(x_i - y_i) >= 0.

    Signs, not products: a product of two tiny numbers can underflow to zero; the sign of a
    floating-point difference is always exact."""
    return not bool((x - y).sign_().mul_(y.sign()).lt_(0).any())


def _all_finite(t: Tensor) -> bool:
    """Whether every entry is finite. A sum is finite only when every term is, and one reduction reads the
    tensor once where `isfinite` makes three passes; a sum of finite entries that overflows is checked entry
    by entry."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class _ComparingMagnitudes:
    """|theta| of the first network, while finding out how theta' relates to it, coordinate-wise:
    whether theta' lies between 0 and theta (theta' is theta pruned or shrunk: y*(x-y) >= 0), or
    theta between 0 and theta', or else whether some signs are opposite."""

    def __init__(self, first: EdgeSource, second: EdgeSource):
        self.first, self.second = first, second
        self.second_inside = self.first_inside = True
        self.conflicts = False

    @contextlib.contextmanager
    def affine(self, name: str, module: nn.Module) -> Iterator[Edges]:
        with paired_edges(self.first, self.second, name, module) as pairs:
            self._compare(name, pairs)
            yield magnitude(pairs[0][0]), magnitude(pairs[1][0])

    def _compare(self, name: str, pairs: list[tuple]) -> None:
        for x, y in pairs:
            if x is None:
                continue
            x, y = common_dtype(x.detach(), y.detach())
            # sign(NaN) is 0, which would pass every test below: the first network's own pass refuses its
            # NaN, the second's is refused here
            if not _all_finite(y):
                raise PathComputationError(f"module {name!r} of the other network holds a NaN or infinite value")
            self.second_inside = self.second_inside and _between_zero_and(x, y)
            self.first_inside = self.first_inside and _between_zero_and(y, x)
            # where either flag still held, no sign differs; so only later tensors need a look
            if not (self.second_inside or self.first_inside):
                self.conflicts = self.conflicts or bool(opposite_signs(x, y).any())

    def compare_every_module(self, graph: PathGraph, model: nn.Module) -> None:
        """The comparison alone, without a pass: each affine module read once, in the order a pass reads them."""
        modules = {name: submodule(model, name) for name in graph.affine_modules()}
        with gathering_in_order(modules.values()):
            for name, module in modules.items():
                with paired_edges(self.first, self.second, name, module) as pairs:
                    self._compare(name, pairs)


def metric_between(graph: PathGraph, model: nn.Module, first: ParameterSource, second: ParameterSource) -> PathMetric:
    """The path-metric between two parameter sources for one captured architecture (MATH.md §3).

    Two walks of the graph: the first network's |theta| network, comparing the two networks on the way;
    then, together, the one (pruning), two (same-sign pair) or three (otherwise) networks the kind needs."""
    return metric_and_norm(graph, model, first, second)[0]


def metric_and_norm(graph: PathGraph, model: nn.Module, first: ParameterSource, second: ParameterSource,
                    norm_first: Optional[tuple[float, float]] = None) -> tuple[PathMetric, tuple[float, float]]:
    """`metric_between`, and (||Phi(theta)||_1, its log) of the first network (MATH.md §2), which the
    metric's first pass computes as `norm_and_log` does. Given them (`norm_first`), that pass only
    compares the two networks' coordinates, reading each module once, and evaluates nothing."""
    a, b = ParameterEdges(first), ParameterEdges(second)
    with torch.no_grad():
        comparing = _ComparingMagnitudes(a, b)
        if norm_first is None:
            _, values = exact_values(graph, model, comparing, 1.0, keep=False)
            norm_first = norm_and_log_of(values[-1], 1.0)
        else:
            comparing.compare_every_module(graph, model)
        log_norm_a = norm_first[1]
        if comparing.second_inside and comparing.first_inside:  # |b| <= |a| <= |b|, same signs: equal
            log_value, kind, exact = -math.inf, "pruning", True
        elif comparing.second_inside or comparing.first_inside:
            (log_norm_b,) = _log_l1s(graph, model, [AbsoluteMagnitudes(b)])
            log_value = log_difference(max(log_norm_a, log_norm_b), min(log_norm_a, log_norm_b))
            kind, exact = "pruning", True
        elif not comparing.conflicts:
            # max(|a|,|b|) and min(|a|,|b|): the difference of their L1 path-norms bounds the metric (MATH.md §3)
            envelopes = Envelopes(a, b)
            log_value = log_difference(*_log_l1s(graph, model, [envelopes.upper, envelopes.lower]))
            kind, exact = "same_sign", False
        else:  # through a's sign split theta'': an exact term and an envelope term (MATH.md §3)
            envelopes = Envelopes(a, b, split_signs=True)
            log_split, log_max, log_min = _log_l1s(graph, model, [envelopes.split, envelopes.upper, envelopes.lower])
            log_value = log_sum(log_difference(log_norm_a, log_split), log_difference(log_max, log_min))
            kind, exact = "general", False
    value = exp_or_inf(log_value)
    if log_norm_a > -math.inf:
        relative = math.exp(log_value - log_norm_a)
    else:  # no path at all in theta: any difference is infinitely large relative to it
        relative = 0.0 if log_value == -math.inf else math.inf
    return PathMetric(value, exact, kind, log_value, relative), norm_first


def parameter_source(network: Network, model: Optional[nn.Module] = None,
                     graph: Optional[PathGraph] = None) -> ParameterSource:
    """A parameter source for a module of the model's architecture or a state dict of it. Given the model and
    its graph, another module must trace to the same calls and layer settings (`architecture.check_same`),
    and a state dict may hold no entry the model lacks: same shapes alone can hide another architecture."""
    if isinstance(network, nn.Module):
        network = unwrapped(network)
        if model is not None and graph is not None and network is not model:
            check_same(graph.architecture, _architecture_of(network, graph.input_shape))
        return ModuleSource(network)
    if isinstance(network, Mapping):
        if model is not None:
            check_state_dict_keys(model, network)
        return StateDictSource(network)
    raise TypeError(f"expected a torch.nn.Module or a state dict, got {type(network).__name__}")


def _architecture_of(network: nn.Module, input_shape: tuple[int, ...]) -> tuple:
    try:
        with warnings.catch_warnings():  # its hooks: only its parameters are read, never its forward
            warnings.simplefilter("ignore", IgnoredHookWarning)
            return capture(network, input_shape).architecture
    except UnsupportedModelError as error:
        raise ParameterMismatchError(f"the other network is not of the model's architecture: {error}") from None


def path_metric(model: nn.Module, other: Network, input_shape: Sequence[int]) -> PathMetric:
    """||Phi(theta) - Phi(theta')||_1 between `model` and `other` (same architecture, or its state dict).

    Picks the cheapest correct computation and says which it used (MATH.md section 3)."""
    model, shape = unwrapped(model), validated_input_shape(input_shape)
    graph = capture(model, shape)
    return metric_between(graph, model, ModuleSource(model), parameter_source(other, model, graph))


def function_distance_bound(model: nn.Module, other: Network, input_shape: Sequence[int],
                            input_inf_norm: float) -> float:
    """Certified bound max(||x||_inf, 1) * ||Phi(theta) - Phi(theta')||_1 on ||R_theta(x) - R_theta'(x)||_1
    for every input x with ||x||_inf <= input_inf_norm (MATH.md section 3)."""
    check_input_inf_norm(input_inf_norm)
    return certified_change(path_metric(model, other, input_shape), input_inf_norm)


def check_input_inf_norm(input_inf_norm: float) -> None:
    # inf would make a metric of 0 certify NaN
    if isinstance(input_inf_norm, bool) or not (isinstance(input_inf_norm, (int, float)) and
                                                0 <= input_inf_norm < math.inf):
        raise ValueError(f"input_inf_norm must be a finite non-negative number, got {input_inf_norm!r}")


def certified_change(metric: PathMetric, input_inf_norm: float) -> float:
    """max(input_inf_norm, 1) * metric.value: the bound on ||R_theta(x) - R_theta'(x)||_1 (MATH.md §3)."""
    return max(float(input_inf_norm), 1.0) * metric.value


def _per_channel_int8(t: Tensor, module: nn.Module) -> Tensor:
    """Symmetric int8 round-to-nearest with one scale per output channel (ConvTranspose weights hold
    their output channels in dim 1, per group); vectors (biases, batch-norm) are left as they are."""
    if t.dim() < 2:
        return t
    t = t.detach()
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):  # (in, out/groups, *k) -> (groups, in/groups, out/groups, k)
        grouped = t.reshape(module.groups, t.shape[0] // module.groups, t.shape[1], -1)
        reduce_dims = (1, 3)
    else:
        grouped = t.reshape(t.shape[0], -1)
        reduce_dims = (1,)
    scale = grouped.abs().amax(dim=reduce_dims, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny) / 127
    return (torch.round(grouped / scale).clamp(-127, 127) * scale).reshape(t.shape)


QUANTIZERS: dict[str, Callable[[Tensor, nn.Module], Tensor]] = {
    "bf16": lambda t, module: t.detach().to(torch.bfloat16).to(t.dtype),
    "fp16": lambda t, module: t.detach().to(torch.float16).to(t.dtype),
    "int8": _per_channel_int8,
}


def quantization_bound(model: nn.Module, quantize: Union[str, Callable[[Tensor], Tensor]],
                       input_shape: Sequence[int]) -> PathMetric:
    """Path-metric between the model and its quantized version, which certifies how far quantization
    can move the function (MATH.md section 3).

    `quantize` is "bf16", "fp16", "int8" (per output channel, symmetric: scale max|w|/127, levels -127..127,
    round-to-nearest, on weights of two or more dimensions; torch.ao's default observer uses -128..127
    and max|w|/127.5, a different model: pass its quantizer, or path_metric the quantized model) or any
    function tensor -> tensor; it is applied to every weight and bias of
    Linear / Conv / ConvTranspose / BatchNorm layers, one module at a time (running statistics stay)."""
    if isinstance(quantize, str):
        if quantize not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {quantize!r}; choose one of {sorted(QUANTIZERS)} or pass a function")
        transform = QUANTIZERS[quantize]
    elif callable(quantize):
        transform = lambda t, module: quantize(t.detach())  # noqa: E731
    else:
        raise TypeError(f"quantize must be a quantizer name or a function tensor -> tensor, got {quantize!r}")
    model, shape = unwrapped(model), validated_input_shape(input_shape)
    source = ModuleSource(model)
    return metric_between(capture(model, shape), model, source, TransformedSource(source, transform))
