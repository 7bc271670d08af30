"""Capture: trace a module once into an explicit graph of path ops (MATH.md section 1).

The graph is a list of `PathOp`s in execution order. Support is decided here, once, for every node,
so that all problems of a model are reported together and before any training step.
"""
from __future__ import annotations

import builtins
import enum
import functools
import operator
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Mapping, Optional, TypeVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .architecture import DROPOUT_FUNCTIONS, DROPOUT_MODULES, signature
from .errors import IgnoredHookWarning, SupportReport, UnsupportedModelError, UnsupportedNode
from .layers import AFFINE_TYPES, BATCH_NORMS, FUNCTIONAL_AFFINE, FunctionalAffine, unsupported_reason
from .pools import FUNCTIONAL_POOLS, INTERPOLATION_DIMS, POOL_TYPES, Interpolation, MeanReduce, Pool, pool_from_module
from .tracer import (ScopedTracer, eval_mode, global_hook_signature, hook_name, hook_signature, ignored_global_hooks,
                     ignored_hooks, untouched)


class OpKind(enum.Enum):
    INPUT = "input"  # the input neurons, evaluated on ones
    AFFINE = "affine"  # Linear / Conv / ConvTranspose / BatchNorm: weighted edges and biases
    POOL = "pool"  # max-pool, average-pool, mean: fixed window edges
    LINEAR = "linear"  # edges of weight +-1 or re-indexing: add, sub, cat, reshape-like, nearest upsampling
    IDENTITY = "identity"  # ReLU, Identity, Dropout, negation: the |theta|^q network passes values through
    SCALE = "scale"  # multiplication or division by a constant c: edges of weight c
    VALUE = "value"  # shapes and constants; no activation involved
    OUTPUT = "output"


@dataclass(frozen=True)
class Ref:
    """The value computed by op number `index`."""

    index: int


@dataclass(frozen=True)
class PathOp:
    kind: OpKind
    label: str
    target: Optional[str] = None  # qualified module name (AFFINE, module ops) or attribute path (VALUE)
    fn: Optional[Callable] = None
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    pool: Optional[Pool] = None
    release: tuple[int, ...] = ()  # values whose last use is this op

    def refs(self) -> list[Ref]:
        """The ops whose values this op reads."""
        found: list[Ref] = []
        fx.node.map_aggregate((self.args, self.kwargs), lambda v: found.append(v) if isinstance(v, Ref) else None)
        return found


@dataclass(frozen=True)
class PathGraph:
    ops: tuple[PathOp, ...]
    input_shape: tuple[int, ...]
    # what another network must share for its parameters to be read in this graph (`architecture.signature`)
    architecture: tuple = field(default=(), compare=False, repr=False)

    def affine_modules(self) -> tuple[str, ...]:
        """Qualified names of the modules whose parameters the graph reads, in execution order."""
        return tuple(op.target for op in self.ops if op.kind is OpKind.AFFINE)


T = TypeVar("T")


class PerGraph(Generic[T]):
    """A value kept for each captured graph (by identity) and dropped with the graph."""

    def __init__(self) -> None:
        self._values: dict[int, T] = {}

    def get(self, graph: PathGraph) -> Optional[T]:
        return self._values.get(id(graph))

    def set(self, graph: PathGraph, value: T) -> None:
        if id(graph) not in self._values:
            weakref.finalize(graph, self._values.pop, id(graph), None)
        self._values[id(graph)] = value


_CLIPPING = "clips its input, so it is not positively homogeneous"
_SMOOTH = "is not piecewise linear and positively homogeneous"
_NEGATIVE_SLOPE = "has a negative slope, outside the ReLU model"
_NORMALIZING = "normalizes by statistics of the current input, which is not an affine map"
KNOWN_UNSUPPORTED_MODULES: dict[type, str] = {
    nn.ReLU6: _CLIPPING, nn.Hardtanh: _CLIPPING, nn.Hardsigmoid: _CLIPPING, nn.Hardswish: _SMOOTH,
    nn.LeakyReLU: _NEGATIVE_SLOPE, nn.PReLU: _NEGATIVE_SLOPE,
    nn.ELU: _SMOOTH, nn.CELU: _SMOOTH, nn.SELU: _SMOOTH, nn.GELU: _SMOOTH, nn.SiLU: _SMOOTH, nn.Mish: _SMOOTH,
    nn.Sigmoid: _SMOOTH, nn.Tanh: _SMOOTH, nn.Softplus: _SMOOTH, nn.Softmax: _SMOOTH, nn.LogSoftmax: _SMOOTH,
    nn.Softmin: _SMOOTH, nn.LayerNorm: _NORMALIZING, nn.GroupNorm: _NORMALIZING,
    nn.InstanceNorm1d: _NORMALIZING, nn.InstanceNorm2d: _NORMALIZING, nn.InstanceNorm3d: _NORMALIZING,
    nn.LocalResponseNorm: _NORMALIZING,
    nn.MultiheadAttention: "attention multiplies activations with each other",
}

_IDENTITY_MODULES = (nn.ReLU, nn.Identity) + DROPOUT_MODULES
# Parameter-free modules whose forward only copies or re-indexes values (or pads with zeros).
_REINDEX_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle,
                    nn.Upsample, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.ZeroPad1d,
                    nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
_LEAF_TYPES = AFFINE_TYPES + POOL_TYPES + _IDENTITY_MODULES + _REINDEX_MODULES + tuple(KNOWN_UNSUPPORTED_MODULES)

_IDENTITY_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, operator.neg, torch.neg} | DROPOUT_FUNCTIONS
_CAST_METHODS = {"float", "double", "half", "bfloat16", "to", "type_as"}
_IDENTITY_METHODS = {"relu", "neg"} | _CAST_METHODS
_SUM_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub}
_SUM_METHODS = {"add", "sub", "__add__", "__sub__", "__radd__"}
_SCALE_FUNCTIONS = {operator.mul: False, torch.mul: False, operator.truediv: True, torch.div: True}
_SCALE_METHODS = {"mul": False, "__mul__": False, "__rmul__": False, "div": True, "__truediv__": True}
_REINDEX_FUNCTIONS = {torch.flatten, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.reshape,
                      torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk,
                      torch.split, torch.narrow, torch.select, torch.movedim, torch.flip, torch.roll,
                      torch.t, torch.sum, operator.getitem, F.pixel_shuffle, F.pixel_unshuffle,
                      torch.channel_shuffle, F.channel_shuffle}
_REINDEX_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze",
                    "chunk", "split", "narrow", "select", "expand", "repeat", "flip", "roll", "t", "sum",
                    "view_as", "reshape_as", "expand_as", "__getitem__", "contiguous", "clone"}
# re-indexing that always writes a new tensor: a change in place of its result or input reaches no other
_COPYING_METHODS = {"repeat", "flip", "roll", "sum", "clone"}
_COPYING_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.flip, torch.roll, torch.sum}
_SHAPE_METHODS = {"size", "dim", "numel"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}
_TRANSPOSE_ATTRIBUTES = {"T", "mT"}
_MEAN_FUNCTIONS = {torch.mean}
_NEAREST = ("nearest", "nearest-exact")
# F.interpolate's parameters after the input, in order
_INTERPOLATE_ARGUMENTS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def _method_name(name: str) -> str:
    """In-place tensor methods map to their out-of-place twins: the path network owns its tensors."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _function_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    prefix = {"torch.nn.functional": "F.", "_operator": "operator.", "operator": "operator."}.get(module, "torch.")
    return prefix + name


def _leaf_type(m: nn.Module) -> Optional[type]:
    """The layer type of the path model that `m` is an instance of, if any."""
    return next((cls for cls in _LEAF_TYPES if isinstance(m, cls)), None)


def _is_leaf(m: nn.Module) -> bool:
    """Layers are recorded as single calls, unless a subclass of a supported layer overrides forward:
    that forward is user code like any other, traced into."""
    matched = _leaf_type(m)
    return matched is not None and (matched in KNOWN_UNSUPPORTED_MODULES or type(m).forward is matched.forward)


def _example(model: nn.Module, input_shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """A meta input of batch 1 in the dtype of the model's first weighted layer (a batch-norm may be kept
    in another precision); none for a graph without input shape."""
    if not input_shape:
        return None
    weights = (m.weight for m in model.modules() if isinstance(m, AFFINE_TYPES) and not isinstance(m, BATCH_NORMS))
    dtype = next((w.dtype for w in weights if isinstance(w, torch.Tensor) and w.is_floating_point()),
                 torch.get_default_dtype())
    return torch.empty((1,) + tuple(input_shape), dtype=dtype, device="meta")


Called = list[tuple[str, nn.Module]]  # the modules a trace calls, root first: (qualified name, module)


def _trace(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[fx.Graph, dict[str, Any], Called]:
    """The fx graph, the tensor literals of `forward` that fx stores as attributes of the root, and the
    modules the trace calls. The model is left as it was (see `untouched`)."""
    if _is_leaf(model):  # a bare layer: fx would trace into its functional forward
        graph = fx.Graph()
        graph.output(graph.call_module("", (graph.placeholder("input"),)))
        return graph, {}, [("", model)]
    tracer = ScopedTracer(_is_leaf, _example(model, input_shape))
    before = set(vars(model))
    try:
        with untouched(model), eval_mode(model):
            graph = tracer.trace(model)
            constants = {key: vars(model)[key] for key in set(vars(model)) - before}
            called = [("", model)] + [entry for entry in tracer.called.values() if entry[1] is not model]
            return graph, constants, called
    except Exception as error:
        name, kind = tracer.failed_in or ("<model>", type(model).__name__)
        cause = f"{type(error).__name__}: {error}"
        reason = (f"could not be traced for input_shape {tuple(input_shape)} ({cause}): the input shape does not "
                  f"fit the model, or forward branches on the values of its input, which cannot be captured"
                  if input_shape else
                  f"could not be traced without an input shape ({cause}): if forward branches on its input's "
                  f"shape, pass input_shape; branches on its values cannot be captured")
        raise UnsupportedModelError((UnsupportedNode(name or "<model>", kind, reason),)) from error


class _Builder:
    """Turns a traced fx graph into path ops, collecting every unsupported node."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], constants: dict[str, Any]):
        self.model = model
        self.constants = constants
        self.input_shape = input_shape
        self.ops: list[PathOp] = []
        self.index: dict[fx.Node, int] = {}
        self.activation: set[fx.Node] = set()
        self.problems: list[UnsupportedNode] = []
        self.inputs_seen = 0
        self.shape_like: set[fx.Node] = set()  # ints and sizes derived from shapes, never tensors
        self.views: set[fx.Node] = set()  # results of re-indexing, which may share memory with their input
        self.viewed: set[fx.Node] = set()  # activations that such a result may share memory with
        self.latest: dict[fx.Node, fx.Node] = {}  # a tensor modified in place -> the node holding its new value

    def build(self, graph: fx.Graph, architecture: tuple) -> PathGraph:
        for node in graph.nodes:
            op = self._op(node)
            if op is None:  # rejected: keep tracing what depends on it, to report every problem
                self.activation.add(node)
                op = PathOp(OpKind.IDENTITY, "unsupported")
            self.index[node] = len(self.ops)
            self.ops.append(op)
        if self.problems:
            raise UnsupportedModelError(tuple(self.problems))
        return PathGraph(_with_releases(self.ops), self.input_shape, architecture)

    # -- helpers -----------------------------------------------------------------------------
    def _current(self, n: fx.Node) -> fx.Node:
        while n in self.latest:  # a tensor changed in place, through itself or through an alias of it
            n = self.latest[n]
        return n

    def _refs(self, value: Any) -> Any:
        return fx.node.map_arg(value, lambda n: Ref(self.index[self._current(n)]))

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(self._current(n)))
        return found

    def _activations(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in self._inputs(node) if n in self.activation]

    def _input_ref(self, node: fx.Node) -> Ref:
        """The activation a single-input op reads, passed positionally or as `input=`."""
        return Ref(self.index[self._current(_split_input(node)[0])])

    def _label(self, node: fx.Node, what: str) -> str:
        scope, kind = node.meta.get("pathmonitor_scope", ("", ""))
        return f"{what} in {scope} ({kind})" if scope else what

    def _reject(self, name: str, kind: str, reason: str) -> None:
        self.problems.append(UnsupportedNode(name, kind, reason))

    def _make(self, node: fx.Node, kind: OpKind, label: str, **fields) -> PathOp:
        if kind is not OpKind.VALUE:
            self.activation.add(node)
        fields.setdefault("args", self._refs(node.args))
        # a dtype argument only changes precision; the path network stays in float64
        fields.setdefault("kwargs", self._refs({k: v for k, v in node.kwargs.items() if k != "dtype"}))
        return PathOp(kind, label, **fields)

    # -- dispatch ------------------------------------------------------------------------------
    def _op(self, node: fx.Node) -> Optional[PathOp]:
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.op == "get_attr":
            if node.target in self.constants:
                constant = self.constants[node.target]
                return PathOp(OpKind.VALUE, f"constant {node.target}", fn=lambda: constant)
            return PathOp(OpKind.VALUE, f"attribute {node.target}", target=node.target)
        if node.op == "output":
            return PathOp(OpKind.OUTPUT, "output", args=self._refs(node.args))
        inputs = self._inputs(node)
        if not self._activations(node):
            if inputs and all(n in self.shape_like for n in inputs):
                self.shape_like.add(node)
            label = self._label(node, _function_name(node.target))
            return self._make(node, OpKind.VALUE, label, fn=self._callable(node))
        if node.op == "call_function" and node.target in FUNCTIONAL_AFFINE:
            return self._functional_affine(node)
        indexing = node.target in (operator.getitem, "__getitem__")  # index tensors select, they do not mix
        problem = _mixing_problem(node, [] if indexing else
                                  [n for n in inputs if n not in self.activation and n not in self.shape_like])
        if problem:
            self._reject(self._scope_name(node), _function_name(node.target) if node.op != "call_module"
                         else type(self.model.get_submodule(node.target)).__name__, problem)
            return None
        if "out" in node.kwargs:
            self._reject(self._scope_name(node), _function_name(node.target),
                         "writes its result into out=, changing a tensor the path graph cannot follow; assign it")
            return None
        op = self._module_op(node) if node.op == "call_module" else self._function_op(node)
        if op is not None and node.op == "call_method" and _in_place(node.target):
            return self._in_place(node, op)
        if op is not None and self._returns_its_input(node):
            # the same tensor under a second name: a later in-place change through either reaches both
            self._alias(self._current(_split_input(node)[0]), node)
        elif op is not None and self._may_return_a_view(node):
            self.views.add(node)
            self.viewed.update(self._activations(node))
        return op

    def _in_place(self, node: fx.Node, op: PathOp) -> Optional[PathOp]:
        """`x.add_(y)` changes x: later reads of x must see this node's value. On a view the change
        would reach the viewed tensor too, which the path graph cannot follow."""
        base = self._current(node.args[0])
        if (base in self.views or base in self.viewed) and op.kind is not OpKind.IDENTITY:
            self._reject(self._scope_name(node), _function_name(node.target),
                         "modifies in place an activation that shares memory with a view; write it out of place")
            return None
        self._alias(base, node)
        return op

    def _alias(self, base: fx.Node, node: fx.Node) -> None:
        """`node` holds the tensor `base` named, from now on: reads of either see it, and it shares
        whatever memory `base` shared with a view."""
        self.latest[base] = node
        if base in self.views:
            self.views.add(node)
        if base in self.viewed:
            self.viewed.add(node)

    def _returns_its_input(self, node: fx.Node) -> bool:
        """Whether the op hands back the very tensor it was given (an in-place ReLU, an identity, dropout
        outside training), so that both names stay one tensor."""
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            return isinstance(module, _IDENTITY_MODULES) and not (isinstance(module, nn.ReLU) and not module.inplace)
        if node.op != "call_function":
            return False
        if node.target in (torch.relu_, F.relu_):
            return True
        if node.target is F.relu:
            return bool(dict(zip(("input", "inplace"), node.args), **node.kwargs).get("inplace", False))
        if node.target in DROPOUT_FUNCTIONS:
            settings = dict(zip(("input", "p", "training", "inplace"), node.args), **node.kwargs)
            inert = not settings.get("training", True) or settings.get("p", 0.5) == 0
            return bool(settings.get("inplace", False)) or inert
        return False

    def _may_return_a_view(self, node: fx.Node) -> bool:
        """Casts return their input when the dtype is already right, a flattening module a view of it."""
        if node.op == "call_module":
            return isinstance(self.model.get_submodule(node.target), (nn.Flatten, nn.Unflatten))
        return node.op == "call_method" and node.target in _CAST_METHODS

    def _placeholder(self, node: fx.Node) -> Optional[PathOp]:
        self.inputs_seen += 1
        if self.inputs_seen == 1:
            self.activation.add(node)
            return PathOp(OpKind.INPUT, f"input {node.target}")
        if node.args:  # an optional argument left at its default
            self.shape_like.add(node)
            return PathOp(OpKind.VALUE, f"default of {node.target}", fn=lambda value=node.args[0]: value)
        self._reject(str(node.target), "input", "the model takes more than one input; path quantities need one")
        return None

    def _callable(self, node: fx.Node) -> Callable:
        if node.op == "call_method":
            return getattr(torch.Tensor, node.target)
        if node.op == "call_module":
            return self.model.get_submodule(node.target).forward
        return node.target

    def _module_op(self, node: fx.Node) -> Optional[PathOp]:
        module = self.model.get_submodule(node.target)
        name = node.target or "<model>"
        kind = type(module).__name__
        label = f"{name} ({kind})"
        matched = _leaf_type(module)
        if matched is None:
            self._reject(name, kind, "is not a supported layer (unknown leaf module)")
            return None
        if matched in KNOWN_UNSUPPORTED_MODULES:
            self._reject(name, kind, KNOWN_UNSUPPORTED_MODULES[matched])
            return None
        if type(module).forward is not matched.forward:
            self._reject(name, kind, f"subclasses {matched.__name__} but overrides forward, so its map is unknown")
            return None
        if isinstance(module, AFFINE_TYPES):
            reason = unsupported_reason(module)
            if reason is None and len(node.args) + len(node.kwargs) > 1:
                reason = "is called with extra arguments (e.g. output_size); only the plain call is supported"
            if reason:
                self._reject(name, kind, reason)
                return None
            return self._make(node, OpKind.AFFINE, label, target=node.target, args=(self._input_ref(node),), kwargs={})
        if isinstance(module, POOL_TYPES):
            if getattr(module, "return_indices", False):
                self._reject(name, kind, "returns indices, which are not activations")
                return None
            return self._make(node, OpKind.POOL, label, pool=pool_from_module(module), args=(self._input_ref(node),),
                              kwargs={})
        if isinstance(module, _IDENTITY_MODULES):
            return self._make(node, OpKind.IDENTITY, label, args=(self._input_ref(node),), kwargs={})
        if isinstance(module, nn.Upsample) and module.mode in INTERPOLATION_DIMS:
            return self._interpolation(node, label, module.mode, module.align_corners, vars(module))
        reason = _reindex_module_problem(module)
        if reason:
            self._reject(name, kind, reason)
            return None
        return self._make(node, OpKind.LINEAR, label, target=node.target, fn=module.forward)

    def _functional_affine(self, node: fx.Node) -> Optional[PathOp]:
        """F.linear, F.conv* or F.batch_norm applied to the tensors of one layer (in a subclass's own
        forward, say) is that layer's affine map, with the settings of the call."""
        what = _function_name(node.target)
        where = self._scope_name(node)
        types, names, keys = FUNCTIONAL_AFFINE[node.target]
        settings = dict(zip(names, node.args), **node.kwargs)
        owners = set()
        for key in keys:
            value = settings.get(key)
            if value is None:
                continue
            attribute = isinstance(value, fx.Node) and value.op == "get_attr" and value.target not in self.constants
            if not (attribute and value.target.rpartition(".")[2] == key):
                self._reject(where, what, f"its {key} is the tensor {value.target!r}, not a layer's own {key}: a fixed "
                                          f"filter outside the path model's parameters" if attribute else
                             f"its {key} is not a layer's own {key} but a tensor computed during forward (weight "
                             f"standardization, say) or passed in, outside the path model")
                return None
            owners.add(value.target.rpartition(".")[0])
        owner = owners.pop() if len(owners) == 1 else None
        module = None if owner is None else self.model.get_submodule(owner)
        if not isinstance(module, types):
            layer = "batch-norm" if types is BATCH_NORMS else types[0].__name__
            self._reject(where, what, f"applies tensors that are not those of one {layer} layer")
            return None
        passed = {key for key in keys if settings.get(key) is not None}
        settings = {key: value for key, value in settings.items() if key != "input" and key not in keys}
        reason = unsupported_reason(module)
        if any(getattr(module, key) is not None and key not in passed for key in keys):
            reason = f"leaves out tensors of {owner} ({type(module).__name__}), so its map is not the layer's"
        elif _reads_nodes(settings):
            reason = "is called with settings computed during forward"
        elif types is BATCH_NORMS and settings.get("training"):
            reason = "normalizes by batch statistics (training=True), which is not an affine map"
        elif types is BATCH_NORMS and settings.get("eps", 1e-5) != module.eps:
            reason = f"uses eps={settings.get('eps', 1e-5)}, not the eps of {owner}, whose statistics it reads"
        if reason:
            self._reject(where, what, reason)
            return None
        apply = None if types is BATCH_NORMS else FunctionalAffine(node.target, settings)
        return self._make(node, OpKind.AFFINE, self._label(node, what), target=owner, fn=apply,
                          args=(self._input_ref(node),), kwargs={})

    def _function_op(self, node: fx.Node) -> Optional[PathOp]:
        target = node.target
        is_method = node.op == "call_method"
        what = _function_name(target)
        label = self._label(node, what)
        name = _method_name(target) if is_method else None
        if ((name == "div") if is_method else (target is torch.div)) and node.kwargs.get("rounding_mode"):
            self._reject(self._scope_name(node), what, "rounds, which is not a linear map")
            return None
        if (name in _IDENTITY_METHODS) if is_method else (target in _IDENTITY_FUNCTIONS):
            return self._make(node, OpKind.IDENTITY, label, args=(self._input_ref(node),), kwargs={})
        if not is_method and target is builtins.getattr:
            return self._attribute(node, label, what)
        if is_method and name in _SHAPE_METHODS:
            self.shape_like.add(node)
            return self._make(node, OpKind.VALUE, label, fn=self._callable(node))
        if (name in _SUM_METHODS) if is_method else (target in _SUM_FUNCTIONS):
            return self._sum(node, label, what)
        if (name in _SCALE_METHODS) if is_method else (target in _SCALE_FUNCTIONS):
            divides = _SCALE_METHODS[name] if is_method else _SCALE_FUNCTIONS[target]
            return self._scale(node, label, what, divides)
        if (name in _REINDEX_METHODS) if is_method else (target in _REINDEX_FUNCTIONS):
            fn = getattr(torch.Tensor, name) if is_method else target
            if not ((name in _COPYING_METHODS) if is_method else (target in _COPYING_FUNCTIONS)):
                self.views.add(node)
                self.viewed.update(self._activations(node))
            return self._make(node, OpKind.LINEAR, label, fn=fn)
        if (name == "mean") if is_method else (target in _MEAN_FUNCTIONS):
            return self._mean(node, label, what)
        if not is_method and target in FUNCTIONAL_POOLS:
            return self._functional_pool(node, label, what)
        if not is_method and target is F.interpolate:
            return self._interpolate(node, label, what)
        if not is_method and target is F.pad:
            _, rest, kwargs = _split_input(node)
            mode = kwargs.get("mode", rest[1] if len(rest) > 1 else "constant")
            value = kwargs.get("value", rest[2] if len(rest) > 2 else None)
            if mode != "constant" or not value:
                return self._make(node, OpKind.LINEAR, label, fn=target)
            self._reject(self._scope_name(node), what, "pads with a non-zero constant, a bias without a parameter")
            return None
        self._reject(self._scope_name(node), what, _function_reason(node, len(self._activations(node))))
        return None

    def _interpolate(self, node: fx.Node, label: str, what: str) -> Optional[PathOp]:
        """Nearest modes copy values (a re-indexing); linear, bilinear and trilinear are fixed maps with
        non-negative coefficients (an `Interpolation`); the output size may be computed during forward."""
        _, rest, kwargs = _split_input(node)
        settings = dict(zip(_INTERPOLATE_ARGUMENTS, rest), **kwargs)
        mode, align_corners = settings.get("mode", "nearest"), settings.get("align_corners")
        if isinstance(mode, fx.Node) or isinstance(align_corners, fx.Node) or isinstance(settings.get("antialias"),
                                                                                          fx.Node):
            self._reject(self._scope_name(node), what, "interpolation with a mode computed during forward")
            return None
        if mode in _NEAREST:
            return self._make(node, OpKind.LINEAR, label, fn=F.interpolate)
        if mode not in INTERPOLATION_DIMS:
            self._reject(self._scope_name(node), what, _interpolation_problem(mode))
            return None
        if settings.get("antialias"):
            self._reject(self._scope_name(node), what, "antialiased interpolation is not supported; pass "
                                                       "antialias=False")
            return None
        return self._interpolation(node, label, mode, align_corners, settings)

    def _interpolation(self, node: fx.Node, label: str, mode: str, align_corners: Optional[bool],
                       settings: dict) -> PathOp:
        """The POOL op of a linear-mode interpolation; its output size or scale factor, possibly computed
        during forward, reaches `Interpolation.magnitudes` as keyword arguments."""
        chosen = {key: settings.get(key) for key in ("size", "scale_factor", "recompute_scale_factor")}
        return self._make(node, OpKind.POOL, label, args=(self._input_ref(node),), kwargs=self._refs(chosen),
                          pool=Interpolation(INTERPOLATION_DIMS[mode], bool(align_corners)))

    def _attribute(self, node: fx.Node, label: str, what: str) -> Optional[PathOp]:
        attribute = node.args[1]
        if attribute in _SHAPE_ATTRIBUTES:
            self.shape_like.add(node)
            return self._make(node, OpKind.VALUE, label, fn=builtins.getattr)
        if attribute in _TRANSPOSE_ATTRIBUTES:
            self.views.add(node)
            self.viewed.update(self._activations(node))
            return self._make(node, OpKind.LINEAR, label, fn=builtins.getattr)
        self._reject(self._scope_name(node), f"{what} {attribute!r}", "reads a tensor attribute outside the path model")
        return None

    def _scope_name(self, node: fx.Node) -> str:
        scope, kind = node.meta.get("pathmonitor_scope", ("", ""))
        return f"{scope} ({kind})" if scope else "<model>"

    def _sum(self, node: fx.Node, label: str, what: str) -> Optional[PathOp]:
        operands = [self._current(a) if isinstance(a, fx.Node) else a for a in _operands(node)]
        alpha = node.kwargs.get("alpha", 1)
        if len(operands) == 2 and all(a in self.activation for a in operands) and alpha in (1, -1):
            refs = [Ref(self.index[a]) for a in operands]
            return self._make(node, OpKind.LINEAR, label, fn=torch.add, args=tuple(refs), kwargs={})
        self._reject(self._scope_name(node), what,
                     "adds a constant to an activation (a bias without a parameter)" if alpha in (1, -1)
                     else "adds with alpha other than +-1")
        return None

    def _scale(self, node: fx.Node, label: str, what: str, divides: bool) -> Optional[PathOp]:
        operands = [self._current(a) if isinstance(a, fx.Node) else a for a in _operands(node)]
        activations = [a for a in operands if a in self.activation]
        if len(activations) == 2:
            self._reject(self._scope_name(node), what, "multiplies two activations, outside the path model")
            return None
        constant = operands[1] if operands[0] in self.activation else operands[0]
        if divides and operands[0] not in self.activation:
            self._reject(self._scope_name(node), what, "divides by an activation, outside the path model")
            return None
        if isinstance(constant, fx.Node) and constant.op == "get_attr":
            self._reject(self._scope_name(node), what,
                         "multiplies by a tensor attribute; only constant numbers are supported")
            return None
        return self._make(node, OpKind.SCALE, label, fn=(lambda c: 1.0 / c) if divides else (lambda c: c),
                          args=(Ref(self.index[activations[0]]), self._refs(constant)), kwargs={})

    def _mean(self, node: fx.Node, label: str, what: str) -> Optional[PathOp]:
        _, rest, kwargs = _split_input(node)
        dim = kwargs.get("dim", rest[0] if rest else None)
        keepdim = kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
        if isinstance(dim, fx.Node) or isinstance(keepdim, fx.Node) or "dtype" in node.kwargs:
            self._reject(self._scope_name(node), what, "mean with computed dimensions or a dtype is not supported")
            return None
        dim = tuple(dim) if isinstance(dim, list) else dim
        return self._make(node, OpKind.POOL, label, pool=MeanReduce(dim, bool(keepdim)),
                          args=(self._input_ref(node),), kwargs={})

    def _functional_pool(self, node: fx.Node, label: str, what: str) -> Optional[PathOp]:
        cls, names = FUNCTIONAL_POOLS[node.target]
        _, rest, kwargs = _split_input(node)
        settings = dict(zip(names, rest), **kwargs)
        if any(isinstance(v, fx.Node) for v in settings.values()):
            self._reject(self._scope_name(node), what, "pooling with computed arguments is not supported")
            return None
        if settings.get("return_indices"):
            self._reject(self._scope_name(node), what, "returns indices, which are not activations")
            return None
        return self._make(node, OpKind.POOL, label, pool=pool_from_module(cls(**settings)),
                          args=(self._input_ref(node),), kwargs={})


def _split_input(node: fx.Node) -> tuple[Any, tuple, dict]:
    """(input, remaining positional arguments, keyword arguments without the input)."""
    if node.args:
        return node.args[0], tuple(node.args[1:]), dict(node.kwargs)
    kwargs = dict(node.kwargs)
    return kwargs.pop("input", None), (), kwargs


def _operands(node: fx.Node) -> list[Any]:
    """The two operands of a binary op, also when the second is passed as `other=`."""
    operands = list(node.args[:2])
    for key in ("input", "other")[len(operands):]:
        if key in node.kwargs:
            operands.append(node.kwargs[key])
    return operands


def _reads_nodes(value: Any) -> bool:
    """Whether `value` holds a value computed during forward, at any depth."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _in_place(method: str) -> bool:
    return method.endswith("_") and not method.endswith("__")


def _mixing_problem(node: fx.Node, constants: list[fx.Node]) -> Optional[str]:
    """Why an op that reads activations is outside the path model for its other inputs, if it is:
    constant tensors mixed into activations act as biases without parameters, integer dtypes round."""
    if constants:
        return (f"combines activations with the tensor {constants[0].name!r}, which is not an activation "
                f"(a constant or an attribute): a bias or weight outside the path model")
    dtypes = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, torch.dtype)]
    if any(not d.is_floating_point for d in dtypes):
        return "casts to a non-floating dtype, which rounds"
    return None


def _interpolation_problem(mode: str) -> str:
    if mode == "area":
        return "area interpolation is adaptive average pooling: write it as F.adaptive_avg_pool*d"
    return (f"mode {mode!r} has negative coefficients; nearest, linear, bilinear and trilinear interpolation are "
            f"supported")


def _reindex_module_problem(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Upsample) and module.mode not in _NEAREST:
        return _interpolation_problem(module.mode)
    if isinstance(module, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)) and module.value != 0:
        return "pads with a non-zero constant, a bias without a parameter"
    return None


def _function_reason(node: fx.Node, activations: int) -> str:
    if activations > 1:
        return "combines activations in a way outside the path model"
    return "is not a supported path operation"


def _with_releases(ops: list[PathOp]) -> tuple[PathOp, ...]:
    """Attach to every op the values whose last use it is, so the interpreter can free them."""
    last_use: dict[int, int] = {}
    for i, op in enumerate(ops):
        for ref in op.refs():
            last_use[ref.index] = i
    releases: dict[int, list[int]] = {}
    for value, user in last_use.items():
        releases.setdefault(user, []).append(value)
    return tuple(PathOp(op.kind, op.label, op.target, op.fn, op.args, op.kwargs, op.pool,
                        tuple(sorted(releases.get(i, ())))) for i, op in enumerate(ops))


def longest_path(graph: PathGraph, weight: Callable[[PathOp], int]) -> int:
    """The largest sum of `weight` over the ops of one input-to-output path of the graph."""
    best: list[int] = []
    for op in graph.ops:
        best.append(max((best[ref.index] for ref in op.refs()), default=0) + weight(op))
    return best[-1]


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}


def _setting(value: Any) -> Any:
    """A comparable stand-in for an attribute: plain values as they are, containers element-wise,
    anything else (functions, tensors, objects) by identity."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_setting(v) for v in value)
    if isinstance(value, dict):
        return tuple((key, _setting(v)) for key, v in value.items())
    return ("object", id(value))


_BOOKKEEPING: dict[type, frozenset[str]] = {}


def ignore_bookkeeping(cls: type, names: Iterable[str]) -> None:
    """Declare attributes that a framework's base class `cls` keeps on its instances and `forward`
    never reads (a trainer's current hook name, say), so that their changes do not trace again."""
    _BOOKKEEPING[cls] = _BOOKKEEPING.get(cls, frozenset()) | frozenset(names)
    _ignored.cache_clear()


@functools.lru_cache(maxsize=None)
def _ignored(cls: type) -> frozenset[str]:
    return _MODULE_INTERNALS.union(*(_BOOKKEEPING.get(base, ()) for base in cls.__mro__))


def _structure(model: nn.Module) -> tuple:
    """What a traced graph depends on: the module tree and every module's own attributes (kernel
    sizes, modes, flags and functions read in forward); a change to any of them means tracing again.
    Forward hooks other than bookkeeping count too: a new one is traced again so as to be warned about."""
    return (global_hook_signature(),) + tuple((name, id(m), type(m), _settings(m, _ignored(type(m))), hook_signature(m))
                                              for name, m in model.named_modules())


def _settings(module: nn.Module, ignored: frozenset[str]) -> tuple:
    # torch.nn.utils.prune recomputes `weight` from `weight_orig` at every forward; forward reads it, the
    # path model reads the original and the mask
    pruned = {key.removesuffix("_orig") for key in module._parameters.keys() if key.endswith("_orig")}
    return tuple((key, _setting(value)) for key, value in vars(module).items() if key not in ignored and
                 key not in pruned)


def capture(model: nn.Module, input_shape: tuple[int, ...]) -> PathGraph:
    """The path graph of `model` for inputs of `input_shape`, traced once and cached per structure."""
    per_model = _CACHE.setdefault(model, {})
    structure = _structure(model)
    cached = per_model.get(input_shape)
    if cached is not None and cached[0] == structure:
        return cached[1]
    traced, constants, called = _trace(model, input_shape)
    graph = _Builder(model, input_shape, constants).build(traced, signature(traced, model))
    per_model[input_shape] = (structure, graph)
    _warn_of_hooks(called)  # once per traced graph: a cached graph returned above has been warned about
    return graph


def _module_label(name: str, module: nn.Module) -> str:
    """'<qualified name> (<class>)', or the class alone for the root."""
    return f"{name} ({type(module).__name__})" if name else type(module).__name__


def _hooked(called: Called) -> list[str]:
    """'<module>: <kind> <hook>' for every hook the path graph leaves out, global ones last."""
    found = [f"{_module_label(name, m)}: {kind} {hook_name(hook)}" for name, m in called
             for _, kind, hook in ignored_hooks(m)]
    return found + [f"every module (global): {kind} {hook_name(hook)}" for _, kind, hook in ignored_global_hooks()]


def _warn_of_hooks(called: Called) -> None:
    """Warn that the forward hooks and pre-hooks of the modules a trace called are not in the path graph."""
    found = _hooked(called)
    if not found:
        return
    listed = "\n".join(f"  - {entry}" for entry in found)
    warnings.warn(f"the model has forward hooks, which are not part of the path model (capture does not run them):\n"
                  f"{listed}\nA hook that changes a module's input or output therefore makes the path-norm and every "
                  f"other path quantity of this model wrong; what a hook does is not checked. Remove such hooks while "
                  f"path quantities are computed, or fold what they do into the module (scale its weights rather than "
                  f"its output, say).", IgnoredHookWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stacklevel, for a warning issued by the calling function, of the first frame outside the modules
    of pathmonitor's core: the warning then points at the call that computed a path quantity."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").rpartition(".")[0] == __package__:
        frame, level = frame.f_back, level + 1
    return level


def topology(model: nn.Module) -> PathGraph:
    """The path graph of `model` for structural questions only; it carries no input shape."""
    return capture(model, ())


def check_graph(model: nn.Module, input_shape: tuple[int, ...]) -> SupportReport:
    """Every unsupported node of `model` (empty report when the model is supported)."""
    try:
        capture(model, input_shape)
    except UnsupportedModelError as error:
        return error.problems
    return SupportReport(())
