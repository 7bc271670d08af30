"""The path-norm as a penalty: its value and its exact gradient (MATH.md section 6).

Two ways to the same gradient:
- parameters that every rank holds in full (one process, DDP, DeepSpeed ZeRO-1/2): one autograd graph
  over the whole |theta|^q network, built on the parameters themselves;
- sharded parameters (DeepSpeed ZeRO-3, FSDP2), where one autograd graph would need every module's
  full parameters at once: a forward pass that keeps the batch-1 activations, then a reverse pass op by
  op, each op evaluated again with autograd, an affine op inside its module's gather. Peak extra memory
  is the largest module's full parameters plus the activations, and every rank walks the same ops in the
  same order, so every gather matches (ZeRO-3 gathers consecutive modules in groups no larger than the
  largest module, in the forward order and then in the reverse one).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .distributed import gathering_in_order, is_dtensor, is_sharded
from .engine import Interpreter, Scaled, exact_values, log_of, map_tensors, model_device, without_autocast
from .errors import PathComputationError
from .graph import OpKind, PathGraph, PathOp, capture
from .layers import parameter_name
from .norms import norm_of, unwrapped, validated_input_shape, validated_q
from .sources import AbsoluteMagnitudes, ModuleSource, ParameterEdges, ParameterSource, Tensors, submodule

GradientSink = Callable[[str, nn.Parameter, Tensor], None]


def path_norm_penalty(model: nn.Module, input_shape: Sequence[int], q: float = 1.0, log: bool = True,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """log ||Phi(theta)||_q (or ||Phi(theta)||_q with `log=False`) as a differentiable 0-dim tensor, to add
    to a loss (MATH.md section 6).

    Unchanged by neuron-wise rescaling, unlike weight decay. The log form has scale-free gradients and stays
    exact far beyond float64. Gradients reach the model's own parameters (`weight_orig` where
    `torch.nn.utils.prune` masks a weight). Batch-norm layers contribute through their running statistics.
    Computed in float64, or in float32 with `dtype=torch.float32`: exact to float32 round-off at any
    magnitude of the path-norm (the same running log-scales; MATH.md section 6 states the limits), and on
    most GPUs many times faster.
    Sharded models (DeepSpeed ZeRO-3, FSDP2) are refused: use `penalty_gradients`.
    """
    model, shape, q = unwrapped(model), validated_input_shape(input_shape), validated_q(q)
    dtype = validated_dtype(dtype)
    if is_sharded(model):
        raise ValueError(f"{type(model).__name__} has sharded parameters (DeepSpeed ZeRO-3 or FSDP2): an autograd "
                         f"graph over the whole network would need them all gathered at once. Use "
                         f"pathmonitor.penalty.penalty_gradients, or the PathNormRegularizer callback.")
    graph = capture(model, shape)
    source = ModuleSource(model, buffers_from_rank_zero=False)  # what its default decides for a model held whole
    _, values = exact_values(graph, model, AbsoluteMagnitudes(ParameterEdges(source), dtype), q, keep=False,
                             dtype=dtype)
    return penalty_of(values[-1], q, log)


def validated_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def training_dtype(model: nn.Module) -> torch.dtype:
    """The dtype to compute a model's penalty in: float64 for a float64 model, else float32 (the master
    weights of fp16 and bf16 training are float32; autograd still hands each parameter its gradient in
    the parameter's own dtype)."""
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return torch.float64 if floating and all(d == torch.float64 for d in floating) else torch.float32


def penalty_of(total: Scaled, q: float, log: bool) -> Tensor:
    """log ||Phi||_q = log(sum of the |theta|^q network's outputs) / q, or ||Phi||_q itself, from that sum.

    Refused, with the reason, where it cannot serve as a penalty: the log of a path-norm of 0 (no path
    carries weight) and a path-norm beyond the dtype's range."""
    if log:
        if float(total.value.detach()) == 0:
            raise ZeroPathNormError(f"the L{q:g} path-norm is 0 (no path carries a nonzero weight, e.g. a last layer "
                                    f"initialized to zero): its log is -inf, with no gradient. Use log=False, or start "
                                    f"the penalty later.")
        return log_of(total, q) / q
    norm = norm_of(total, q)
    if math.isinf(float(norm.detach())):
        raise PathComputationError(f"the L{q:g} path-norm is exp({float(log_of(total, q).detach()) / q:.6g}), beyond "
                                   f"{str(norm.dtype).removeprefix('torch.')}, so it cannot serve as a penalty: "
                                   f"use log=True")
    return norm


class ZeroPathNormError(PathComputationError):
    """The path-norm is 0, so its log has no value or gradient to offer as a penalty."""


def penalty_gradients(graph: PathGraph, model: nn.Module, source: ParameterSource, q: float, log: bool,
                      sink: GradientSink, dtype: torch.dtype = torch.float64) -> float:
    """The penalty of `path_norm_penalty` on the weights read from `source`, computed in `dtype`; each
    parameter's gradient goes to `sink(qualified name, parameter, gradient)` (MATH.md section 6).

    The gradient has the parameter's full shape (a DTensor of the parameter's placements under FSDP2). A
    parameter read by several ops (a module called twice, tied weights) may reach the sink once per use:
    the sink must add; the name is the one under which the reading module holds it, so a tied parameter
    may come under several names. Under sharding this is a collective, and the sink is called inside the
    gather of the parameter's module. With `log=True` a path-norm of 0 gives -inf and no gradient."""
    model = unwrapped(model)
    differentiate = _op_by_op if is_sharded(model) else _whole_graph
    # rank 0's running statistics are broadcast once, though the op-by-op reverse pass reads every module again
    held = source.buffers_held() if isinstance(source, ModuleSource) else contextlib.nullcontext()
    try:
        with held, without_autocast(model_device(model)):  # the op-by-op reverse pass evaluates ops outside `walk`
            return differentiate(graph, model, source, q, log, sink, validated_dtype(dtype))
    except ZeroPathNormError:  # raised before any gradient reaches the sink, on every rank alike
        return -math.inf


def _whole_graph(graph: PathGraph, model: nn.Module, source: ParameterSource, q: float, log: bool,
                 sink: GradientSink, dtype: torch.dtype) -> float:
    """One autograd graph over the whole |theta|^q network, built on the parameters themselves."""
    magnitudes = AbsoluteMagnitudes(ParameterEdges(source), dtype)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        _, values = exact_values(graph, model, magnitudes, q, keep=False, dtype=dtype)
        penalty = penalty_of(values[-1], q, log)
        if not penalty.requires_grad:  # no parameter on any path
            return float(penalty.detach())
        grads = torch.autograd.grad(penalty, [p for _, p in named], allow_unused=True)
    found = [(name, p, grad) for (name, p), grad in zip(named, grads) if grad is not None]
    _check_finite(found)
    for name, p, grad in found:
        sink(name, p, grad)
    return float(penalty.detach())


def _check_finite(found: list[tuple[str, nn.Parameter, Tensor]]) -> None:
    """Refuse NaN or infinite gradients (a parameter that is NaN or infinite), naming one, before any is used."""
    plain = [(name, grad) for name, _, grad in found if not is_dtensor(grad)]  # a DTensor's check is per shard
    # one fused kernel for the 2-norm of every gradient (torch.nn.utils.clip_grad_norm_ uses it too; the
    # inf-norm kernel is several times slower): finite unless an entry is NaN or infinite, or its squares
    # overflow, which the check of each tensor then tells apart
    if plain and not bool(torch.isfinite(torch.stack(torch._foreach_norm([g for _, g in plain]))).all()):
        name = next((name for name, grad in plain if not bool(torch.isfinite(grad).all())), None)
        if name is not None:
            raise PathComputationError(f"the path-norm penalty's gradient for {name!r} is not finite: a parameter "
                                       f"is NaN or infinite, or the gradient leaves the range of its dtype")


def _op_by_op(graph: PathGraph, model: nn.Module, source: ParameterSource, q: float, log: bool,
              sink: GradientSink, dtype: torch.dtype) -> float:
    """Reverse-mode differentiation one op at a time, re-evaluating each op on its kept inputs."""
    magnitudes = AbsoluteMagnitudes(ParameterEdges(source), dtype)
    with torch.no_grad():
        interpreter, values = exact_values(graph, model, magnitudes, q, keep=True, dtype=dtype)
    total = values[-1]
    leaf = total.value.detach().requires_grad_(True)
    with torch.enable_grad():
        penalty = penalty_of(Scaled(leaf, total.log_scale), q, log)
        (seed,) = torch.autograd.grad(penalty, [leaf])
    upstream: dict[int, Any] = {len(graph.ops) - 1: seed}
    with gathering_in_order(submodule(model, name) for name in reversed(graph.affine_modules())):
        for index in range(len(graph.ops) - 1, -1, -1):
            grad = upstream.pop(index, None)
            op = graph.ops[index]
            if grad is None or op.kind in (OpKind.INPUT, OpKind.VALUE):
                continue
            for read, read_grad in _op_backward(op, grad, values, interpreter, model, source, sink).items():
                upstream[read] = _add(upstream.get(read), read_grad)
    return float(penalty.detach())


def _op_backward(op: PathOp, grad: Any, values: list[Any], interpreter: Interpreter, model: nn.Module,
                 source: ParameterSource, sink: GradientSink) -> dict[int, Any]:
    """Gradients of the activations `op` reads, given the gradient of its value; an affine op's parameter
    gradients go to the sink."""
    reads = dict.fromkeys(ref.index for ref in op.refs() if isinstance(values[ref.index], Scaled))
    leaves = {i: Scaled(map_tensors(values[i].value, lambda t: t.detach().requires_grad_(True)), values[i].log_scale)
              for i in reads}
    inputs = [t for i in reads for t in _flat(leaves[i].value) if t is not None]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        evaluator, named = interpreter, []
        if op.kind is OpKind.AFFINE:  # differentiate inside the gather, while the parameters are whole
            module = submodule(model, op.target)
            tensors = stack.enter_context(source.tensors(op.target, module))
            evaluator = Interpreter(interpreter.graph, model, AbsoluteMagnitudes(ParameterEdges(_Opened(tensors)),
                                    interpreter.dtype), interpreter.q, interpreter.log_scaled,
                                    interpreter.device, interpreter.dtype)
            named = [(parameter_name(op.target, n), p) for n, p in module.named_parameters() if p.requires_grad]
        value = evaluator.evaluate_op(op, _Overlay(values, leaves)).value
        pairs = [(out, g) for out, g in zip(_flat(value), _flat(grad)) if g is not None and out.requires_grad]
        wrt = inputs + [p for _, p in named]
        if not pairs or not wrt:
            return {}
        grads = torch.autograd.grad([out for out, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        found = [(name, p, g) for (name, p), g in zip(named, grads[len(inputs):]) if g is not None]
        _check_finite(found)
        for name, p, g in found:
            sink(name, p, g)
    input_grads = iter(grads[:len(inputs)])
    return {i: _unflat(values[i].value, [None if t is None else next(input_grads) for t in _flat(leaves[i].value)])
            for i in reads}


class _Overlay:
    """The kept values with some entries replaced by gradient-recording leaves."""

    def __init__(self, values: list[Any], replaced: dict[int, Any]):
        self.values, self.replaced = values, replaced

    def __getitem__(self, index: int) -> Any:
        return self.replaced.get(index, self.values[index])


class _Opened:
    """A parameter source handing out tensors read once already (inside a gather still open)."""

    def __init__(self, tensors: Tensors):
        self.opened = tensors

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[Tensors]:
        yield self.opened


def _flat(value: Any) -> list[Optional[Tensor]]:
    """The tensors of an activation (a tensor or a tuple of them from chunk/split), in order."""
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    return [value if isinstance(value, Tensor) else None]


def _unflat(like: Any, flat: list[Optional[Tensor]]) -> Any:
    """`flat` arranged like the activation `like`."""
    if isinstance(like, (tuple, list)):
        return type(like)(_unflat(v, flat) for v in like)
    return flat.pop(0)


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, (tuple, list)):
        return type(a)(_add(x, y) for x, y in zip(a, b))
    return a + b
