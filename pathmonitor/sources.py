"""Where the engine gets edge weights from (DESIGN.md layer 4).

Three small layers, each with one job:
- a `ParameterSource` hands out the full raw tensors of one module at a time, inside a context, so that
  a sharded source (DeepSpeed ZeRO-3, FSDP2) can gather a module's parameters and free them right after;
- an `EdgeSource` turns them into the signed edge weights and biases of the path model (batch-norm
  folded), possibly combining two networks (the sign split of MATH.md section 3);
- an `EdgeMagnitudes` turns those into the non-negative weights of the network the engine evaluates:
  |theta| for path-norms, max/min envelopes for path-metrics, gradient-tracking leaves for scores.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import type_before_parametrizations
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .architecture import prefix_hint
from .distributed import (LastModuleMemo, from_rank_zero, full, full_shape, gathered, is_buffer_key, is_sharded,
                          own_device, world)
from .errors import ParameterMismatchError
from .layers import edge_parameters, parameter_name, tensor_names
from .tracer import compiled_original, uncompiled_name

Tensors = Mapping[str, Optional[Tensor]]
Edges = tuple[Tensor, Optional[Tensor]]


class ParameterSource(Protocol):
    def tensors(self, name: str, module: nn.Module) -> contextlib.AbstractContextManager[Tensors]:
        """Full tensors named by `layers.tensor_names(module)` for the module called `name`."""


class ModuleSource:
    """The tensors of the module called `name` inside `root`, as its forward would use them.

    Sharded parameters (DeepSpeed ZeRO-3, FSDP2 DTensors) are gathered module by module and freed right
    after (ZeRO-3: with the group of modules a pass announced, `distributed.gathering_in_order`, freed
    when a module of another group is read), which makes every read a collective. With
    `buffers_from_rank_zero` every rank reads rank 0's running statistics; by default it does so exactly
    when the parameters are sharded (every rank takes part then anyway), so a plain or DDP model is read
    locally, from any single rank. With `keeps_alive=False` the source holds `root` weakly."""

    def __init__(self, root: nn.Module, buffers_from_rank_zero: Optional[bool] = None, *, keeps_alive: bool = True):
        # a source kept beside the model for as long as it lives (a tracked model's) must not keep it alive
        self._root: Callable[[], Optional[nn.Module]] = (lambda: root) if keeps_alive else weakref.ref(root)
        if buffers_from_rank_zero is None:
            buffers_from_rank_zero = is_sharded(root)
        self.buffers_from_rank_zero = buffers_from_rank_zero and world()[1] > 1
        self._rank_zero_buffers: Optional[dict[str, dict[str, Tensor]]] = None

    @property
    def root(self) -> nn.Module:
        return _alive(self._root)

    def reads(self, model: nn.Module) -> bool:
        return self._root() is model

    @contextlib.contextmanager
    def buffers_held(self) -> Iterator[None]:
        """Within it, rank 0's running statistics of every module are broadcast together, at the first read
        that needs them, and kept: for passes over unchanged buffers. Every rank must enter it together
        (reads are collectives)."""
        outer = self._rank_zero_buffers
        self._rank_zero_buffers = {} if outer is None else outer
        try:
            yield
        finally:
            self._rank_zero_buffers = outer

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[Tensors]:
        try:
            own = submodule(self.root, name)
        except AttributeError:
            raise ParameterMismatchError(
                f"the other network has no module {name!r} ({type(module).__name__})") from None
        if own is not module:
            _check_same_kind(name, own, module)
        with gathered(own):
            tensors = {key: full(_effective(own, key)) for key in tensor_names(module)}
            if self.buffers_from_rank_zero:
                tensors.update(self._rank_zero(name, {key: t for key, t in tensors.items()
                                                      if t is not None and is_buffer_key(key)}))
            yield tensors

    def _rank_zero(self, name: str, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        held = self._rank_zero_buffers
        if held is None or not buffers:
            return dict(zip(buffers, from_rank_zero(list(buffers.values())))) if buffers else {}
        if not held:  # buffers are small: one broadcast for all of them rather than one per module read
            held.update(self._every_module_rank_zero())
        found = held.setdefault(name, {})
        unregistered = {key: t for key, t in buffers.items() if key not in found}  # not in the module's _buffers
        found.update(zip(unregistered, from_rank_zero(list(unregistered.values()))))
        return {key: found[key] for key in buffers}

    def _every_module_rank_zero(self) -> dict[str, dict[str, Tensor]]:
        """Rank 0's running statistics of every layer of the model a graph can read them from (its
        batch-norms), by the module's qualified names."""
        named = list(self.root.named_modules(remove_duplicate=False))
        owned = {id(m): {key: b for key in tensor_names(m) if is_buffer_key(key)
                         and (b := m._buffers.get(key)) is not None} for _, m in named}
        flat = [(owner, key, b) for owner, buffers in owned.items() for key, b in buffers.items()]
        copies: dict[int, dict[str, Tensor]] = {owner: {} for owner in owned}
        for (owner, key, _), copy in zip(flat, from_rank_zero([b for _, _, b in flat])):
            copies[owner][key] = copy
        return {name: copies[id(m)] for name, m in named}


def _check_same_kind(name: str, own: nn.Module, module: nn.Module) -> None:
    """The other network's module `own` can stand in for the model's `module` under the model's graph."""
    # a parametrized module has a class of its own per instance: the class it had before counts
    kind, other_kind = type_before_parametrizations(own), type_before_parametrizations(module)
    if kind is not other_kind:
        raise ParameterMismatchError(f"module {name!r} is a {kind.__name__} in the other network, "
                                     f"a {other_kind.__name__} in the model")
    if getattr(own, "eps", None) != getattr(module, "eps", None):  # batch-norm is folded with the model's
        raise ParameterMismatchError(f"batch-norm {name!r} has eps={own.eps} in the other network, "
                                     f"eps={module.eps} in the model")


def submodule(root: nn.Module, name: str) -> nn.Module:
    """`root.get_submodule(name)`, read straight from the module tables: every pass looks up every layer,
    and `get_submodule` goes through `Module.__getattr__` at each level."""
    module = root
    for part in name.split(".") if name else ():
        # torch.compile's wrappers are looked through, where only one of the two networks has them
        original = compiled_original(module)
        if original is not None and part != "_orig_mod":
            module = original
        elif part == "_orig_mod" and original is None:
            continue
        child = module._modules.get(part)
        if child is None:  # not a registered child: torch's own lookup says why
            return root.get_submodule(name)
        module = child
    return compiled_original(module) or module


def _alive(reference: Callable[[], Optional[nn.Module]]) -> nn.Module:
    module = reference()
    if module is None:
        raise ReferenceError("the model this reads was deleted")
    return module


def _effective(module: nn.Module, key: str) -> Optional[Tensor]:
    """The tensor the module's forward would use now. torch.nn.utils.prune and the older
    `torch.nn.utils.weight_norm` / `spectral_norm` refresh `weight` only in a forward pre-hook, so the
    attribute may be one step stale (and its autograd graph already freed): it is computed here from the
    parameters instead. Parametrizations compute it on access."""
    # looked up where prune registers them: a missing attribute would cost an exception in Module.__getattr__
    original, mask = module._parameters.get(f"{key}_orig"), module._buffers.get(f"{key}_mask")
    if original is not None and mask is not None:
        return original * mask
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm) and hook.name == key:
            return hook.compute_weight(module, do_power_iteration=False)  # the power iteration belongs to forward
        if isinstance(hook, WeightNorm) and hook.name == key:
            return hook.compute_weight(module)
    return getattr(module, key, None)


class StateDictSource:
    """Tensors read from a state dict with the model's qualified names."""

    def __init__(self, state_dict: Mapping[str, Tensor]):
        self.state_dict = state_dict
        # names as the model's, without the `_orig_mod.` of torch.compile's wrappers on either side
        self._entries = {uncompiled_name(key): t for key, t in state_dict.items()}

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[Tensors]:
        found = {}
        entries = self._entries
        device = own_device(module)  # a state dict loaded on the CPU is read beside a model on another device
        for key in tensor_names(module):
            full = uncompiled_name(parameter_name(name, key))
            if full in entries:
                found[key] = entries[full].to(device)
            elif f"{full}_orig" in entries and f"{full}_mask" in entries:  # torch.nn.utils.prune
                found[key] = entries[f"{full}_orig"].to(device) * entries[f"{full}_mask"].to(device)
            elif getattr(module, key, None) is not None:
                raise ParameterMismatchError(f"the state dict has no entry {full!r} for module {name!r} "
                                             f"({type(module).__name__}){prefix_hint(self.state_dict, full)}")
            else:
                found[key] = None
        yield found


class MetaSource:
    """Empty tensors of the right shapes on the meta device, for a shape-only dry run."""

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[Tensors]:
        found = {key: getattr(module, key, None) for key in tensor_names(module)}
        yield {key: None if t is None else torch.empty(tuple(full_shape(t)),
                                                          dtype=torch.float64, device="meta")
               for key, t in found.items()}


class TransformedSource:
    """Another source with `transform(tensor, module)` applied to every weight and bias (running
    statistics untouched), e.g. a quantizer; nothing is copied beyond the module being read."""

    def __init__(self, source: ParameterSource, transform: Callable[[Tensor, nn.Module], Tensor]):
        self.source = source
        self.transform = transform

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[Tensors]:
        with self.source.tensors(name, module) as tensors:
            yield {key: t if t is None or is_buffer_key(key) else self.transform(t, module)
                   for key, t in tensors.items()}


class EdgeSource(Protocol):
    def edges(self, name: str, module: nn.Module) -> contextlib.AbstractContextManager[Edges]:
        """Signed (edge weights, biases) of the affine module `name` (MATH.md section 1)."""


class ParameterEdges:
    """The edges of one network, from its parameter source."""

    def __init__(self, source: ParameterSource):
        self.source = source

    @contextlib.contextmanager
    def edges(self, name: str, module: nn.Module) -> Iterator[Edges]:
        with self.source.tensors(name, module) as tensors:
            yield edge_parameters(module, tensors)


def check_same_layout(name: str, a: Optional[Tensor], b: Optional[Tensor]) -> None:
    if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
        describe = lambda t: "none" if t is None else tuple(t.shape)  # noqa: E731
        raise ParameterMismatchError(
            f"module {name!r} differs between the two networks: {describe(a)} vs {describe(b)}")


def common_dtype(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Both tensors in the wider of their dtypes, so that comparing them rounds nothing."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


@contextlib.contextmanager
def paired_edges(first: EdgeSource, second: EdgeSource, name: str, module: nn.Module) -> Iterator[list[tuple]]:
    """[(weight of first, weight of second), (bias of first, bias of second)], checked to match."""
    with first.edges(name, module) as a, second.edges(name, module) as b:
        pairs = list(zip(a, b))
        for x, y in pairs:
            check_same_layout(name, x, y)
        yield pairs


def magnitude(t: Optional[Tensor], dtype: torch.dtype = torch.float64) -> Optional[Tensor]:
    """|t| in `dtype`: a fresh tensor, never a view of the model's own."""
    if t is None:
        return None
    if t.requires_grad and torch.is_grad_enabled():
        return t.abs().to(dtype)  # abs before widening: half the memory traffic
    # no graph to keep: widen into a fresh buffer and work in place, one allocation in all
    return t.detach().to(dtype, copy=True).abs_()


class EdgeMagnitudes(Protocol):
    def affine(self, name: str, module: nn.Module) -> contextlib.AbstractContextManager[Edges]:
        """Non-negative (edge weights, biases) of the affine module `name`, in float64 unless the
        interpreter that reads them computes in another dtype; the interpreter raises them to its q."""


class AbsoluteMagnitudes:
    """|w| and |b|: the network whose output sum, with every weight raised to q by the interpreter, is
    ||Phi(theta)||_q^q (MATH.md section 2); in float64 unless another `dtype` is asked for."""

    def __init__(self, edges: EdgeSource, dtype: torch.dtype = torch.float64):
        self.edges_source = edges
        self.dtype = dtype

    @contextlib.contextmanager
    def affine(self, name: str, module: nn.Module) -> Iterator[Edges]:
        with self.edges_source.edges(name, module) as (weight, bias):
            yield magnitude(weight, self.dtype), magnitude(bias, self.dtype)


class Envelopes:
    """max(|theta|, |theta'|) and min(|theta|, |theta'|) coordinate-wise (MATH.md section 3), as the
    magnitudes `upper` and `lower`. With `split_signs`, theta is first replaced by theta'': theta with every
    coordinate whose sign differs from theta' set to zero, and `split` is |theta''| (|theta| without it).

    The three of a module are computed together, once for every network of a walk that reads them, and in
    place in float64 buffers: on a CPU each fresh weight-sized tensor costs a page fault per 4 KB, more
    than the arithmetic."""

    def __init__(self, first: EdgeSource, second: EdgeSource, split_signs: bool = False):
        self.sources = (first, second)
        self.split_signs = split_signs
        self._magnitudes: LastModuleMemo[tuple[Edges, Edges, Edges]] = LastModuleMemo()
        self.upper, self.lower, self.split = _Envelope(self, 0), _Envelope(self, 1), _Envelope(self, 2)

    def magnitudes(self, name: str, module: nn.Module) -> tuple[Edges, Edges, Edges]:
        return self._magnitudes.get(name, lambda: self._compute(name, module))

    def _compute(self, name: str, module: nn.Module) -> tuple[Edges, Edges, Edges]:
        upper, lower, split = [], [], []
        with paired_edges(*self.sources, name, module) as pairs:
            for x, y in pairs:
                if x is None:
                    upper.append(None), lower.append(None), split.append(None)
                    continue
                first = x.detach().to(torch.float64, copy=True)
                if self.split_signs:
                    first.masked_fill_(opposite_signs(x, y), 0.0)
                first.abs_()
                second = y.detach().to(torch.float64, copy=True).abs_()
                lower.append(torch.minimum(first, second))
                upper.append(torch.maximum(first, second, out=second))
                split.append(first)
        return tuple(upper), tuple(lower), tuple(split)  # type: ignore[return-value]


def opposite_signs(x: Tensor, y: Tensor) -> Tensor:
    """Where x and y have opposite signs (zeros have none): signs, not the product x*y, which can underflow
    to zero."""
    return torch.sign(x).mul_(torch.sign(y)).lt(0)


class _Envelope:
    """One of the magnitudes of `Envelopes` (0: max, 1: min, 2: the first network's, split)."""

    def __init__(self, envelopes: Envelopes, which: int):
        self.envelopes, self.which = envelopes, which

    @contextlib.contextmanager
    def affine(self, name: str, module: nn.Module) -> Iterator[Edges]:
        yield self.envelopes.magnitudes(name, module)[self.which]


class ScoringMagnitudes:
    """|theta| with the weights of `selected` modules as float64 leaves that record gradients (MATH.md §4).

    A leaf is created once per module and reused, so a second pass (or a second call of a shared
    module) accumulates into the same gradient."""

    def __init__(self, edges: EdgeSource, selected: set[str]):
        self.edges_source = edges
        self.selected = selected
        self.leaves: dict[str, Tensor] = {}

    @contextlib.contextmanager
    def affine(self, name: str, module: nn.Module) -> Iterator[Edges]:
        with self.edges_source.edges(name, module) as (weight, bias):
            if name in self.selected:
                if name not in self.leaves:
                    self.leaves[name] = magnitude(weight.detach()).requires_grad_(True)
                yield self.leaves[name], magnitude(bias.detach() if bias is not None else None)
            else:
                yield magnitude(weight.detach()), magnitude(bias.detach() if bias is not None else None)

