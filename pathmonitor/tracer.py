"""Tracing a module's forward into an fx graph that knows the input's shape (MATH.md section 1).

The path graph is defined for one input shape, so shape questions asked by forward code (`x.shape`,
`x.size(1)`, `x.dim()`, `len(x)`) are answered with numbers during tracing: every traced value also
carries a meta tensor (shape and dtype, no data) computed alongside it, and Python control flow on
shapes follows the branch the real input takes. Where no meta value can be computed (an op meta
tensors do not support), the value falls back to being symbolic, as plain fx tracing would have it.

Forward hooks and pre-hooks are not run while tracing; the functions at the end of this file tell which
of them that leaves out of the graph (all but the bookkeeping of pruning, weight and spectral norms,
ZeRO-3 and FSDP).
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn.modules.module as torch_module
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook
from torch.nn.utils.weight_norm import WeightNorm

from .distributed import full_shape
from .layers import BATCH_NORMS

_NO_META = object()  # a value whose meta tensor could not be computed


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the duration; each module's own flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:  # the flag itself: a custom train() override may have side effects
            m.training = False
        yield
    finally:
        for m, training in flags:
            m.training = training


_MODULE_TABLES = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Every module's attributes, and the parameters, buffers and children it had, as they were before,
    with every buffer's values: forward code runs while being traced, and may count calls, cache tables
    per input shape (holding tracing proxies) or store tensor literals. Parameters, buffers and children
    that forward registers on its first call stay: the graph uses them, as the next real call would."""
    saved = [(m, dict(vars(m)), {key: dict(vars(m)[key].items()) for key in _MODULE_TABLES}) for m in model.modules()]
    values = {id(b): (b, b.detach().clone()) for b in model.buffers()}
    try:
        yield
    finally:
        for module, attributes, tables in saved:
            live = {key: vars(module)[key] for key in _MODULE_TABLES}
            vars(module).clear()
            vars(module).update(attributes)
            for key, table in tables.items():  # .items(): ZeRO-3's tables gather on item access
                registered = {name: value for name, value in live[key].items() if name not in table}
                attributes[key].clear()
                attributes[key].update(table)
                attributes[key].update(registered)
        with torch.no_grad():
            for buffer, value in values.values():
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


def _meta_tensor(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A tensor's meta twin at its full shape (a ZeRO-3 partition is empty on every rank), floating
    tensors in `dtype` when given."""
    chosen = dtype if dtype is not None and t.is_floating_point() else t.dtype
    return torch.empty(full_shape(t), dtype=chosen, device="meta")


def _meta_of(value: Any) -> Any:
    """The meta counterpart of a traced argument, or _NO_META when one of its parts has none."""
    if isinstance(value, fx.proxy.Attribute):
        root = _meta_of(value.root)
        return _NO_META if root is _NO_META else getattr(root, value.attr)
    if isinstance(value, fx.Proxy):
        return vars(value).get("_meta", _NO_META)
    if isinstance(value, Tensor):
        return value if value.is_meta else _meta_tensor(value)
    if isinstance(value, (tuple, list)):
        parts = [_meta_of(v) for v in value]
        if any(p is _NO_META for p in parts):
            return _NO_META
        return type(value)(*parts) if hasattr(value, "_fields") else type(value)(parts)  # a namedtuple
    if isinstance(value, dict):
        parts = {k: _meta_of(v) for k, v in value.items()}
        return _NO_META if any(p is _NO_META for p in parts.values()) else parts
    return value


class ShapedProxy(fx.Proxy):
    """A proxy whose shape questions are answered from its meta tensor when it has one."""

    def _known(self) -> Optional[Tensor]:
        meta = vars(self).get("_meta", _NO_META)
        return meta if isinstance(meta, Tensor) else None

    def _symbolic(self, method: str, *args: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_method", method, (self,) + args, {})

    @property
    def shape(self) -> Any:
        meta = self._known()
        return meta.shape if meta is not None else fx.Proxy.__getattr__(self, "shape")

    @property
    def ndim(self) -> Any:
        meta = self._known()
        return meta.ndim if meta is not None else fx.Proxy.__getattr__(self, "ndim")

    @property
    def dtype(self) -> Any:
        meta = self._known()
        return meta.dtype if meta is not None else fx.Proxy.__getattr__(self, "dtype")

    def size(self, dim: Optional[int] = None) -> Any:
        meta = self._known()
        if meta is None:
            return self._symbolic("size") if dim is None else self._symbolic("size", dim)
        return meta.size() if dim is None else meta.size(dim)

    def dim(self) -> Any:
        meta = self._known()
        return meta.dim() if meta is not None else self._symbolic("dim")

    def numel(self) -> Any:
        meta = self._known()
        return meta.numel() if meta is not None else self._symbolic("numel")

    # `a += b` on a tensor changes `a` in place; fx proxies have no in-place operators, so Python would
    # record `a = a + b` and miss the change any other name of that tensor sees
    def __iadd__(self, other: Any) -> Any:
        return self._in_place("add_", other) if self._known() is not None else self + other

    def __isub__(self, other: Any) -> Any:
        return self._in_place("sub_", other) if self._known() is not None else self - other

    def __imul__(self, other: Any) -> Any:
        return self._in_place("mul_", other) if self._known() is not None else self * other

    def __itruediv__(self, other: Any) -> Any:
        return self._in_place("div_", other) if self._known() is not None else self / other

    def _in_place(self, method: str, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_method", method, (self, other), {})

    def __len__(self) -> int:
        meta = vars(self).get("_meta", _NO_META)
        if isinstance(meta, (Tensor, tuple, list)):
            return len(meta)
        return fx.Proxy.__len__(self)


class ShapedSequenceProxy(ShapedProxy):
    """A traced tuple or list of known length (the parts of a split or a chunk): loops over it work."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        return iter([self[i] for i in range(len(self))])


def compiled_original(module: nn.Module) -> Optional[nn.Module]:
    """The module that `torch.compile` wrapped, if `module` is its wrapper."""
    original = module._modules.get("_orig_mod")
    return original if isinstance(original, nn.Module) else None


def uncompiled_name(name: str) -> str:
    """A qualified name without the `_orig_mod` parts that torch.compile's wrappers add."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod") if "_orig_mod" in name else name


class ScopedTracer(fx.Tracer):
    """Records, for every node, the qualified name and type of the module whose forward created it,
    and, given an example meta input, the meta value of every node (see the module docstring).

    `leaf(m)` says which modules are recorded as single calls rather than traced into."""

    def __init__(self, leaf: Callable[[nn.Module], bool], example: Optional[Tensor] = None) -> None:
        super().__init__()
        self._leaf = leaf
        self._example = example
        self._scopes: list[tuple[str, str]] = [("", "")]
        self._computing_meta = False
        self.failed_in: Optional[tuple[str, str]] = None
        self.called: dict[int, tuple[str, nn.Module]] = {}  # every module the trace calls, by id: (name, module)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self._leaf(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if self._computing_meta:  # a parametrization computing a leaf's weight: plain code, not traced
            return forward(*args, **kwargs)
        original = compiled_original(m)
        if original is not None:  # a child wrapped by torch.compile: its original module is what computes
            return self.call_module(original, original.forward, args, kwargs)
        scope = (self.path_of_module(m), type(m).__name__)
        self.called.setdefault(id(m), (scope[0], m))
        self._scopes.append(scope)
        try:
            # m.forward, not the wrapped __call__: the user's hooks must not see tracing proxies
            return super().call_module(m, m.forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or scope
            raise
        finally:
            self._scopes.pop()

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:  # a child that forward has just built: the paths were listed when tracing began
            self.submodule_paths = {m: name for name, m in self.root.named_modules()}
            return super().path_of_module(mod)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["pathmonitor_scope"] = self._scopes[-1]
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapedProxy(node, self)

    def trace(self, root, concrete_args=None):
        # `torch.jit.isinstance(x, torch.Tensor)` guards branches in forward code (MONAI's, say): a
        # traced tensor must pass it, or the branch the real input takes is silently skipped
        checking = torch.jit.isinstance
        torch.jit.isinstance = lambda value, kind: checking(_meta_of(value), kind)
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.jit.isinstance = checking

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self._example is not None:
            proxy._meta = self._meta(kind, target, args, kwargs)
            if isinstance(proxy, ShapedProxy) and isinstance(proxy._meta, (tuple, list)):
                proxy.__class__ = ShapedSequenceProxy
        return proxy

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        # while a meta value is computed, module attributes are plain values, not new graph nodes
        return attr_val if self._computing_meta else super().getattr(attr, attr_val, parameter_proxy_cache)

    def _meta(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The meta value of a new node, computed from its arguments' meta values."""
        if kind == "placeholder":
            first = not any(n.op == "placeholder" for n in list(self.graph.nodes)[:-1])
            return self._example if first else _NO_META
        self._computing_meta = True
        try:
            if kind == "get_attr":
                value = self._attribute(target)
                return _meta_tensor(value) if isinstance(value, Tensor) else _NO_META
            metas = _meta_of((args, kwargs))
            if metas is _NO_META or kind not in ("call_function", "call_method", "call_module"):
                return _NO_META
            (args, kwargs) = metas
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            module = self.root.get_submodule(target)
            if _keeps_shape(module, args, kwargs):
                return torch.empty_like(args[0])
            return _meta_twin(module, _floating_dtype(args)).forward(*args, **kwargs)
        except Exception:  # an op without meta support: its value stays symbolic
            return _NO_META
        finally:
            self._computing_meta = False

    def _attribute(self, target: str) -> Any:
        """The tensor a get_attr node names, read from the owner's own dictionaries: attribute access
        on modules is patched while tracing and would record a node of its own."""
        owner, _, key = target.rpartition(".")
        module = self.root.get_submodule(owner)
        for table in (module._parameters, module._buffers, vars(module)):
            for name, value in table.items():  # .items(): ZeRO-3's tables gather on item access
                if name == key:
                    return value
        return None


def _keeps_shape(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether the module is a batch-norm layer of the library's own (its forward not overridden) called
    on an input whose channels it normalizes: its output has the input's shape and dtype. Its forward on
    meta tensors runs a Python decomposition that takes most of a small model's tracing time."""
    x = args[0] if len(args) == 1 and not kwargs else None
    return (type(module) in BATCH_NORMS and isinstance(x, Tensor) and x.dim() >= 2
            and x.is_floating_point() and x.shape[1] == module.num_features)


def _floating_dtype(args: tuple) -> Optional[torch.dtype]:
    first = next((a for a in args if isinstance(a, Tensor)), None)
    return first.dtype if first is not None and first.is_floating_point() else None


def _meta_twin(module: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """A stand-in for a leaf layer whose parameters and buffers are meta tensors of full shape, in the
    dtype of its input (a layer kept in another precision computes the same shapes), so its forward
    computes output shapes without data, without hooks and without gathering shards. A layer under
    torch.nn.utils.parametrize stands in as its plain class holding the computed tensors."""
    parametrized = parametrize.is_parametrized(module)
    twin = object.__new__(type(module).__mro__[1] if parametrized else type(module))
    twin.__dict__.update(vars(module))
    tensors = dict(module._parameters.items())  # .items(): ZeRO-3's tables gather on item access
    if parametrized:
        tensors.update({name: getattr(module, name) for name in module.parametrizations})
        twin._modules = {k: m for k, m in module._modules.items() if k != "parametrizations"}
    twin._parameters = {k: None if p is None else nn.Parameter(_meta_tensor(p, dtype), p.requires_grad)
                        for k, p in tensors.items()}
    twin._buffers = {k: None if b is None else _meta_tensor(b, dtype) for k, b in module._buffers.items()}
    return twin


# -- forward hooks, which tracing does not run -------------------------------------------------------------
# Hooks of these types recompute a weight from other tensors before forward; the path model reads the weight
# the same way (sources._effective), so leaving them out changes nothing
_BOOKKEEPING_HOOK_TYPES = (prune.BasePruningMethod, WeightNorm, SpectralNorm, SpectralNormStateDictHook,
                           SpectralNormLoadStateDictPreHook)
# Hooks defined in these packages gather and release sharded parameters around forward (ZeRO-3, FSDP), which
# the path model reads by itself
_BOOKKEEPING_HOOK_PACKAGES = ("deepspeed", "torch.distributed.fsdp", "torch.distributed._composable")
_BOOKKEEPING_HOOK_PREFIXES = tuple(f"{package}." for package in _BOOKKEEPING_HOOK_PACKAGES)
_HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"))
_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType)


def _innermost(hook: Callable) -> Callable:
    """The function or object a hook wraps, through bound methods, functools.partial and decorators that
    record `__wrapped__` (functools.wraps, torch's own hook wrapper): a wrapper's module says nothing of
    where the hook's code comes from."""
    for _ in range(100):  # a bound: a wrapper may point back at itself
        if isinstance(hook, functools.partial):
            inner = hook.func
        elif isinstance(hook, types.MethodType):
            inner = hook.__func__
        else:  # the instance dictionary: a callable object's __getattr__ may answer anything
            inner = getattr(hook, "__dict__", {}).get("__wrapped__")
        if inner is None or inner is hook:
            return hook
        hook = inner
    return hook


def _origin(inner: Callable) -> str:
    """The name of the Python module that defines an unwrapped hook's code: the function's, or the callable
    object's class's."""
    if isinstance(inner, _FUNCTION_TYPES):
        return getattr(inner, "__module__", None) or ""
    return type(inner).__module__ or ""


def is_bookkeeping_hook(hook: Callable) -> bool:
    """Whether a forward hook is one the path model accounts for or that leaves values alone."""
    inner = _innermost(hook)
    if not isinstance(inner, _FUNCTION_TYPES) and isinstance(inner, _BOOKKEEPING_HOOK_TYPES):
        return True
    origin = _origin(inner)
    return origin.startswith(_BOOKKEEPING_HOOK_PREFIXES) or origin in _BOOKKEEPING_HOOK_PACKAGES


def hook_name(hook: Callable) -> str:
    """A short name for a hook: its function's qualified name, or its class's for a callable object, and
    the module that defines it."""
    inner = _innermost(hook)
    if isinstance(inner, _FUNCTION_TYPES):
        name = getattr(inner, "__qualname__", None) or repr(inner)
    else:
        name = f"{type(inner).__qualname__} object"
    name = f"functools.partial({name})" if isinstance(hook, functools.partial) else name
    name = name if len(name) <= 80 else name[:77] + "..."
    origin = _origin(inner)
    return f"{name} from {origin}" if origin else name


def _non_bookkeeping(tables: tuple[Any, ...]) -> list[tuple[int, str, Callable]]:
    """(handle id, kind, hook) of every hook of forward-pre-hook and forward-hook `tables` tracing leaves out."""
    return [(key, kind, hook) for table, (_, kind) in zip(tables, _HOOK_KINDS) for key, hook in table.items()
            if not is_bookkeeping_hook(hook)]


def ignored_hooks(module: nn.Module) -> list[tuple[int, str, Callable]]:
    """(handle id, kind, hook) of every forward hook and pre-hook of `module` that is not bookkeeping."""
    return _non_bookkeeping(tuple(vars(module).get(attribute) or {} for attribute, _ in _HOOK_KINDS))


def ignored_global_hooks() -> list[tuple[int, str, Callable]]:
    """(handle id, kind, hook) of every global forward hook and pre-hook (they run for every module) that
    is not bookkeeping."""
    return _non_bookkeeping((torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks))


def hook_signature(module: nn.Module) -> tuple[int, ...]:
    """The handle ids of the hooks of `module` that `ignored_hooks` lists: a new one must be warned about."""
    found = vars(module)
    if not (found.get("_forward_hooks") or found.get("_forward_pre_hooks")):  # the common case, kept cheap
        return ()
    return tuple(key for key, _, _ in ignored_hooks(module))


def global_hook_signature() -> tuple[int, ...]:
    """The handle ids of the hooks `ignored_global_hooks` lists."""
    if not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks):
        return ()
    return tuple(key for key, _, _ in ignored_global_hooks())
