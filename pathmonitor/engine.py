"""Execute: one interpreter for the |theta|^q network of a captured graph (MATH.md section 2).

It walks the path ops in order on an input of ones (batch 1, float64 unless a caller asks for float32),
reading one module's edge weights at a time from an `EdgeMagnitudes`. Every activation is carried as
(tensor, log_scale), meaning tensor * exp(log_scale). In plain mode log_scale stays 0; in log-scaled
mode each affine output is renormalized so nothing overflows, and a bias enters multiplied by
exp(-log_scale).
The same code runs with or without autograd; the renormalization constants are detached, which
leaves gradients exact because the value is log(sum(tensor)) + log_scale with log_scale held fixed.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from .distributed import gathering_in_order
from .errors import ParameterMismatchError, PathComputationError
from .graph import OpKind, PathGraph, PathOp, PerGraph, Ref
from .layers import apply_affine, bias_view
from .sources import EdgeMagnitudes, submodule


# the ops whose output can be smaller than their inputs; sums, re-indexing and identities cannot sink
_SHRINKING = (OpKind.AFFINE, OpKind.POOL, OpKind.SCALE)

# the log-scale of an activation that is zero everywhere: any other would, where it is summed with
# others, rescale them to it (a zero with the huge scale of its input would flush them to zero)
_ZERO_SCALE = -math.inf


@dataclass(frozen=True)
class Scaled:
    """An activation (a tensor, or a tuple of tensors from chunk/split) worth value * exp(log_scale)."""

    value: Any
    log_scale: float = 0.0


def map_tensors(value: Any, fn) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def _times_exp(t: Tensor, log_max: float, exponent: float) -> Tensor:
    """t * exp(exponent), where max(t) = exp(log_max) and log_max + exponent <= 0 (so the result is
    at most 1). When exp(exponent) alone would leave t's dtype, t is first divided by its maximum."""
    if log_max == -math.inf:
        return t
    if abs(exponent) < math.log(torch.finfo(t.dtype).max) - 10:
        return t * math.exp(exponent)
    return t / float(t.detach().max()) * math.exp(exponent + log_max)


def _log_max(t: Tensor) -> float:
    largest = float(t.detach().max()) if t.numel() else 0.0
    return math.log(largest) if largest > 0 else -math.inf


class Interpreter:
    def __init__(self, graph: PathGraph, model: nn.Module, magnitudes: EdgeMagnitudes, q: float,
                 log_scaled: bool, device: torch.device, dtype: torch.dtype = torch.float64):
        self.graph = graph
        self.model = model
        self.magnitudes = magnitudes  # handing out edge weights in `dtype`
        self.q = q
        self.log_scaled = log_scaled
        self.device = device
        self.dtype = dtype
        self._peaks: list[Tensor] = []  # plain mode: the max of every activation that can shrink, and of |w|^q
        self._modules: dict[str, nn.Module] = {}  # looked up once per pass: a lookup walks the module tree

    def run(self) -> Scaled:
        """The sum of all outputs of the |theta|^q network, as Scaled(0-dim tensor, log_scale)."""
        return self.values(keep=False)[-1]

    def values(self, keep: bool) -> list[Any]:
        """The value of every op (the last one is the total); with `keep=False` each is dropped after
        its last use, so only the total is left."""
        return walk([self], keep)[0]

    def step(self, i: int, op: PathOp, values: list[Any], keep: bool) -> None:
        """Evaluate op `i` into `values`."""
        values[i] = self.evaluate_op(op, values)
        if not self.log_scaled and op.kind in _SHRINKING:
            map_tensors(values[i].value, self._watch)
        if not keep:
            for released in op.release:
                values[released] = None

    def module(self, name: str) -> nn.Module:
        if name not in self._modules:
            self._modules[name] = submodule(self.model, name)
        return self._modules[name]

    def _watch(self, t: Tensor) -> Tensor:
        if t.numel():
            self._peaks.append(t.detach().max())  # stays on the device: read once, at the end
        return t

    def stayed_in_range(self) -> bool:
        """Whether every activation of a plain pass that can shrink stayed inside `precise_range`, even
        when the total looks fine: one that sank towards subnormals lost relative precision (or, at
        exactly 0, paths that the log-scaled pass keeps), and one far above it gives a gradient that sinks."""
        if not self._peaks:
            return True
        smallest, largest = precise_range(self.dtype)
        peaks = torch.stack(self._peaks)
        return not bool(((peaks <= smallest) | (peaks >= largest)).any())

    def evaluate_op(self, op: PathOp, values: Sequence[Any]) -> Any:
        """The value of `op` from the values of the ops it reads, failures named after the op."""
        try:
            return self._evaluate(op, values)
        except (PathComputationError, ParameterMismatchError):
            raise
        except Exception as error:
            raise PathComputationError(
                f"evaluating {op.label} for input_shape {self.graph.input_shape} failed: "
                f"{type(error).__name__}: {error}") from error

    # -- argument resolution ---------------------------------------------------------------
    def _resolve(self, op: PathOp, values: Sequence[Any]) -> tuple[tuple, dict, float]:
        """Arguments with activations brought to one common log-scale, and that scale."""
        common = max((values[ref.index].log_scale for ref in op.refs() if isinstance(values[ref.index], Scaled)),
                     default=0.0)

        def value_of(v: Any) -> Any:
            if not isinstance(v, Ref):
                return v
            held = values[v.index]
            if not isinstance(held, Scaled):
                return held
            if held.log_scale == common:
                return held.value
            factor = math.exp(held.log_scale - common)
            return map_tensors(held.value, lambda t: t * factor)

        args, kwargs = fx.node.map_aggregate((op.args, op.kwargs), value_of)
        return args, kwargs, common

    # -- evaluation per kind -------------------------------------------------------------------
    def _evaluate(self, op: PathOp, values: Sequence[Any]) -> Any:
        kind = op.kind
        if kind is OpKind.INPUT:
            return Scaled(torch.ones((1,) + self.graph.input_shape, dtype=self.dtype, device=self.device))
        if kind is OpKind.VALUE:
            if op.fn is None:
                return functools.reduce(getattr, op.target.split("."), self.model)
            args, kwargs, _ = self._resolve(op, values)
            return op.fn(*args, **kwargs)
        if kind is OpKind.OUTPUT:
            return self._total(op, values)
        args, kwargs, scale = self._resolve(op, values)
        if kind is OpKind.IDENTITY:
            return Scaled(args[0], scale)
        if kind is OpKind.LINEAR:
            return Scaled(op.fn(*args, **kwargs), scale)
        if kind is OpKind.POOL:  # keyword arguments: settings computed during forward (an output size)
            return Scaled(op.pool.magnitudes(args[0], self.q, **kwargs), scale)
        if kind is OpKind.SCALE:
            constant = op.fn(args[1])
            if not isinstance(constant, (int, float)):
                raise PathComputationError(f"{op.label}: the constant factor is a {type(constant).__name__}, "
                                           f"not a number; only scaling by numbers is in the path model")
            if constant == 0:
                return Scaled(args[0] * 0.0, _ZERO_SCALE if self.log_scaled else scale)
            log_factor = self.q * math.log(abs(constant))
            if self.log_scaled:  # exact at any magnitude: the factor joins the log-scale
                return Scaled(args[0], scale + log_factor)
            return Scaled(args[0] * (math.exp(log_factor) if log_factor < 709 else math.inf), scale)
        return self._affine(op, args[0], scale)

    def _affine(self, op: PathOp, x: Tensor, log_scale: float) -> Scaled:
        module = self.module(op.target)
        # a functional call on the layer's tensors carries its own settings (a padding, say)
        apply = op.fn or functools.partial(apply_affine, module)
        with self.magnitudes.affine(op.target, module) as (weight, bias):
            if not self.log_scaled:
                return Scaled(apply(x, self._powered(weight), self._powered(bias)))
            (weight, weight_log), (bias, bias_log) = self._normalized_power(weight), self._normalized_power(bias)
            z = apply(x, weight, None)
            z_log = _log_max(z)
            terms = [z_log + weight_log + log_scale]
            if bias is not None:
                bias_max = _log_max(bias)
                terms.append(bias_max + bias_log)
            new_scale = max(terms)
            if new_scale == -math.inf:
                return Scaled(z, _ZERO_SCALE)
            out = _times_exp(z, z_log, weight_log + log_scale - new_scale)
            if bias is not None:
                out = out + bias_view(module, _times_exp(bias, bias_max, bias_log - new_scale), z.dim())
            return Scaled(out, new_scale)

    def _powered(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """|w|^q of a plain pass; with q != 1, (max |w|)^q is watched like an activation's largest entry:
        out of the precise range (|w|^q over- or underflowing, to 0 too) it sends the pass to running
        log-scales. A tensor of zeros is exact."""
        if t is None or self.q == 1:
            return t
        if t.numel():
            peak = t.detach().max()
            self._peaks.append(torch.where(peak > 0, peak ** self.q, torch.ones_like(peak)))
        return t.pow(self.q)

    def _normalized_power(self, t: Optional[Tensor]) -> tuple[Optional[Tensor], float]:
        """(|w| / m)^q and q log m, m = max |w|, for a log-scaled pass: |w|^q never formed, so it can
        neither overflow nor underflow as a whole (MATH.md section 2). With q = 1, |w| itself and 0."""
        if t is None or self.q == 1:
            return t, 0.0
        log_max = _log_max(t)
        if log_max == -math.inf:
            return t, -math.inf
        return (t / math.exp(log_max)).pow(self.q), self.q * log_max

    def _total(self, op: PathOp, values: Sequence[Any]) -> Scaled:
        leaves = [values[ref.index] for ref in op.refs() if isinstance(values[ref.index], Scaled)]
        sums: list[tuple[Tensor, float]] = []
        for leaf in leaves:
            map_tensors(leaf.value, lambda t: sums.append((t.sum(), leaf.log_scale)))
        if not sums:
            return Scaled(torch.zeros((), dtype=self.dtype, device=self.device))
        common = max(scale for _, scale in sums)
        if common == _ZERO_SCALE:  # every output is zero
            common = 0.0
        total = sum(s * math.exp(scale - common) for s, scale in sums)
        return Scaled(total, common)


def walk(interpreters: Sequence[Interpreter], keep: bool) -> list[list[Any]]:
    """The values of every op of several interpreters of one graph, evaluated op by op in lockstep: each
    module is read (under ZeRO-3 gathered) once for all of them, while it is current."""
    graph = interpreters[0].graph
    all_values: list[list[Any]] = [[None] * len(graph.ops) for _ in interpreters]
    with gathering_in_order(interpreters[0].module(name) for name in graph.affine_modules()), \
            without_autocast(interpreters[0].device):
        for i, op in enumerate(graph.ops):
            for interpreter, values in zip(interpreters, all_values):
                interpreter.step(i, op, values, keep)
    return all_values


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device`: a pass called inside a mixed-precision training step (manual optimization)
    would otherwise run its float32 convolutions in bf16 or fp16."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def evaluate(graph: PathGraph, model: nn.Module, magnitudes: EdgeMagnitudes, q: float, *,
             log_scaled: bool, device: Optional[torch.device] = None) -> Scaled:
    """Sum of all outputs of the |theta|^q network of `graph` on an input of ones."""
    if device is None:
        device = model_device(model)
    return Interpreter(graph, model, magnitudes, q, log_scaled, device).run()


def precise_range(dtype: torch.dtype) -> tuple[float, float]:
    """The values a plain pass may reach and be trusted, 1e-280 to 1e280 in float64 (1e-34 to 1e34 in
    float32): below, relative precision is lost to subnormals; above, the gradient of the log, 1/total,
    sinks towards them."""
    smallest = 1e-280 if dtype == torch.float64 else torch.finfo(dtype).tiny ** 0.91
    return smallest, 1 / smallest


def is_precise(total: Tensor) -> bool:
    """Whether a plain pass's total can be trusted: inside `precise_range` of its dtype."""
    smallest, largest = precise_range(total.dtype)
    return smallest < float(total.detach()) < largest


def log_of(total: Scaled, q: float) -> Tensor:
    """log of the value of a Scaled total, refusing NaN and +inf with the reason."""
    log = torch.log(total.value) + total.log_scale
    if bool(torch.isnan(log)) or float(log.detach()) == math.inf:
        raise PathComputationError(
            f"the |theta|^q network (q = {q:g}) produced {float(log.detach())}: a parameter is NaN or infinite")
    return log


def exact_values(graph: PathGraph, model: nn.Module, magnitudes: EdgeMagnitudes, q: float, *, keep: bool,
                 device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float64) -> tuple[Interpreter, list[Any]]:
    """The interpreter and the values of a pass whose total is exact (to the round-off of `dtype`): a
    plain pass, repeated with running log-scales when anything in it over- or underflows (both exact,
    the plain one cheaper); once a graph needed them, its later passes in that dtype and q start there."""
    return exact_walks(graph, model, [magnitudes], q, keep=keep, device=device, dtype=dtype)[0]


def exact_walks(graph: PathGraph, model: nn.Module, networks: Sequence[EdgeMagnitudes], q: float, *, keep: bool,
                device: Optional[torch.device] = None,
                dtype: torch.dtype = torch.float64) -> list[tuple[Interpreter, list[Any]]]:
    """`exact_values` of several |theta|^q networks of one graph, evaluated in lockstep (`walk`); those
    whose plain pass left the range are evaluated again together, with running log-scales."""
    device = model_device(model) if device is None else device
    needed = _NEEDED_LOG_SCALES.get(graph)
    log_scaled = list(range(len(networks)))
    results: list[Optional[tuple[Interpreter, list[Any]]]] = [None] * len(networks)
    plain_first = needed is None or (dtype, q) not in needed
    if plain_first:
        plain = [Interpreter(graph, model, m, q, False, device, dtype) for m in networks]
        log_scaled = []
        for k, (interpreter, values) in enumerate(zip(plain, walk(plain, keep))):
            if is_precise(values[-1].value) and interpreter.stayed_in_range():
                results[k] = (interpreter, values)
            else:
                log_scaled.append(k)
        del plain, interpreter, values  # the failed passes' activations (and autograd graphs) go before the next walk
    if log_scaled:
        again = [Interpreter(graph, model, networks[k], q, True, device, dtype) for k in log_scaled]
        for k, interpreter, values in zip(log_scaled, again, walk(again, keep)):
            results[k] = (interpreter, values)
        # for good only where a plain pass was wrong: a total of exactly 0 (no path carries weight, as when a
        # pruning round tries removing every weight) is exact in both
        if plain_first and any(float(results[k][1][-1].value.detach()) != 0 for k in log_scaled):
            _NEEDED_LOG_SCALES.set(graph, (needed or frozenset()) | {(dtype, q)})
    return results  # type: ignore[return-value]


# the (dtype, q) whose plain pass did not stay in range once for a graph: its later evaluations (the next
# training steps) start with running log-scales rather than repeat a pass
_NEEDED_LOG_SCALES: PerGraph[frozenset[tuple[torch.dtype, float]]] = PerGraph()


def log_total(graph: PathGraph, model: nn.Module, magnitudes: EdgeMagnitudes, q: float,
              device: Optional[torch.device] = None) -> Tensor:
    """log of the sum of all outputs of the |theta|^q network, as a 0-dim tensor (differentiable when
    autograd is on)."""
    _, values = exact_values(graph, model, magnitudes, q, keep=False, device=device)
    return log_of(values[-1], q)


def model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device
