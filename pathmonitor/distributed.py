"""Full tensors of one module at a time while training is sharded (DESIGN.md layer 4).

- Single process, DDP, DeepSpeed ZeRO-1/2: every rank holds full parameters; nothing to gather.
- DeepSpeed ZeRO-3: every rank holds an empty partition (`p.ds_numel` entries in all, `p.numel() == 0`);
  `held_in_full` assembles parameters and frees them on exit. A pass announces the modules it will read
  (`gathering_in_order`), and consecutive ones are gathered together, in groups no larger than the
  largest module: one collective per group, at the peak memory of one module.
- FSDP2 (`fully_shard`): parameters are DTensors; `full_tensor()` assembles one.
Gathering is a collective: every rank must read the same modules in the same order. The engine does,
since it walks one captured graph. Buffers are never sharded, but DeepSpeed does not synchronize them
and DDP's copies drift between its broadcasts, so `buffers_from_rank_zero` makes every rank read rank
0's running statistics (a broadcast into a temporary; the model's own buffers stay as they are).

`ShardedSnapshot` is a frozen copy of the tensors a path graph reads, kept the way the parameters are:
a full copy when they are full, 1/world of every tensor per rank when they are sharded.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ParameterMismatchError, PathComputationError
from .layers import parameter_name, tensor_names

if TYPE_CHECKING:
    from .sources import ParameterSource

T = TypeVar("T")


def is_zero3_parameter(t: Tensor) -> bool:
    """Whether `t` is a DeepSpeed ZeRO-3 parameter (its data may be an empty partition)."""
    return "ds_id" in vars(t)  # DeepSpeed sets it as an attribute; hasattr would raise and catch on every miss


def full_shape(t: Tensor) -> torch.Size:
    """The shape of the whole parameter, also when this rank holds an empty ZeRO-3 partition of it."""
    return t.ds_shape if is_zero3_parameter(t) else t.shape


def zero3_partition_size(p: nn.Parameter) -> int:
    """Entries per rank of a ZeRO-3 parameter (DeepSpeed's own count: the buffer may be offloaded)."""
    return p.ds_tensor.ds_numel


def zero3_padded(p: nn.Parameter, full: Tensor) -> Tensor:
    """`full` flattened and padded with zeros to world x partition, as ZeRO-3 lays a parameter out."""
    world_size = dist.get_world_size(group=p.ds_process_group)
    padded = full.new_zeros(zero3_partition_size(p) * world_size)
    padded[:full.numel()] = full.reshape(-1)
    return padded


def zero3_piece(p: nn.Parameter, full: Tensor) -> Tensor:
    """The entries of `full` (the parameter's shape) that this rank's ZeRO-3 partition holds."""
    size = zero3_partition_size(p)
    rank = dist.get_rank(group=p.ds_process_group)
    return zero3_padded(p, full)[rank * size:(rank + 1) * size]


def has_class_named(obj: object, name: str) -> bool:
    """Whether `obj` is an instance of a class called `name`: a test that imports nothing."""
    return name in _class_names(type(obj))


@functools.lru_cache(maxsize=None)
def _class_names(cls: type) -> frozenset[str]:
    return frozenset(base.__name__ for base in cls.__mro__)  # asked for every tensor of every pass


def is_dtensor(t: Tensor) -> bool:
    """Whether `t` is a DTensor (FSDP2 / tensor parallel)."""
    return has_class_named(t, "DTensor")


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` lives in shards across ranks (ZeRO-3 or DTensor)."""
    return any(is_zero3_parameter(p) or is_dtensor(p) for p in model.parameters())


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """The module's ZeRO-3 parameters hold their full data for the duration (a collective). Those of its
    children too: an affine module's only children are parametrizations, whose `original` it reads.
    Inside `gathering_in_order`, a module of the announced order is gathered with its group instead."""
    plan = _PLANS[-1] if _PLANS else None
    if plan is not None and plan.provides(module):
        yield
        return
    partitioned = [p for p in module.parameters() if is_zero3_parameter(p)]  # held_in_full skips held ones
    if not partitioned:
        yield
        return
    with held_in_full(partitioned):
        yield


@contextlib.contextmanager
def held_in_full(params: list[nn.Parameter]) -> Iterator[None]:
    """The ZeRO-3 parameters `params` hold their full data for the duration, and are partitioned again on
    exit (a collective: every rank passes the same parameters in the same order).

    Those DeepSpeed keeps plainly partitioned (this rank's partition in memory, no quantized or secondary
    copy) are assembled here with one all-gather per process group and dtype, where DeepSpeed's own
    gather makes one collective per parameter (about 1 ms each on gloo); the others go through
    `deepspeed.zero.GatheredParameters`. Parameters held in full already (by a pass, by an enclosing
    scope, or by DeepSpeed itself: persistent and prefetched ones) are left as they are, to their holder.
    Every rank sees the same statuses, so every rank makes the same collectives."""
    params = list(dict.fromkeys(params))  # a tensor registered twice: once
    if params:
        status = _zero3_status()
        in_flight = [p for p in params if p.ds_status == status.INFLIGHT]
        if in_flight:
            raise PathComputationError(
                f"ZeRO-3 parameter ds_id={in_flight[0].ds_id} (shape {tuple(in_flight[0].ds_shape)}) is being "
                f"gathered by DeepSpeed (a prefetch in flight): compute path quantities between training steps "
                f"(a callback hook after the backward or the optimizer step), not inside a forward or backward")
        params = [p for p in params if p.ds_status != status.AVAILABLE]
    plain, others = [], []
    for p in params:
        (plain if _plainly_partitioned(p) else others).append(p)
    with contextlib.ExitStack() as stack:
        if others:
            import deepspeed  # only reached when DeepSpeed made the parameters

            stack.enter_context(deepspeed.zero.GatheredParameters(others, modifier_rank=None))
        for group in dict.fromkeys(p.ds_process_group for p in plain):
            members = [p for p in plain if p.ds_process_group is group]
            pieces = [p.ds_tensor.reshape(-1).narrow(0, 0, zero3_partition_size(p)).to(p.device) for p in members]
            for p, whole in zip(members, _assemble(pieces, [tuple(p.ds_shape) for p in members], group)):
                stack.callback(_partition_again, p, p.data)
                p.data = whole
                p.ds_status = _zero3_status().AVAILABLE
        yield


def _zero3_status() -> Any:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return ZeroParamStatus


def _plainly_partitioned(p: nn.Parameter) -> bool:
    """Whether this rank holds its partition of `p` in memory, in the parameter's dtype, and nothing else."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    return (p.ds_status == _zero3_status().NOT_AVAILABLE and getattr(p, "ds_secondary_tensor", None) is None
            and p.ds_tensor is not None and not hasattr(p.ds_tensor, "ds_quant_scale")
            and getattr(p.ds_tensor, "status", None) == PartitionedParamStatus.AVAILABLE
            and p.ds_tensor.dtype == p.dtype and p.ds_tensor.numel() >= zero3_partition_size(p))


def _partition_again(p: nn.Parameter, partitioned: Tensor) -> None:
    p.data = partitioned
    p.ds_status = _zero3_status().NOT_AVAILABLE


class _GatherPlan:
    """The modules a pass will read, in order, cut into groups of consecutive modules holding together at
    most as many ZeRO-3 entries as the largest of them; one group is held in full at a time."""

    def __init__(self, modules: list[nn.Module]):
        self.group_of: dict[int, int] = {}
        self.groups: list[list[nn.Parameter]] = []
        partitioned = {id(m): [p for p in _parameters_of(m) if is_zero3_parameter(p)] for m in modules}
        sizes = {key: sum(p.ds_numel for p in params) for key, params in partitioned.items()}
        budget = max(sizes.values(), default=0)
        if budget == 0:  # nothing sharded: every module is provided as it is
            self.group_of = dict.fromkeys(sizes, -1)
        filled = 0
        for m in modules:
            if budget == 0 or id(m) in self.group_of:
                continue
            if not self.groups or filled + sizes[id(m)] > budget:
                self.groups.append([])
                filled = 0
            self.group_of[id(m)] = len(self.groups) - 1
            self.groups[-1] += partitioned[id(m)]
            filled += sizes[id(m)]
        self.held_index: Optional[int] = None
        self._context: Optional[contextlib.AbstractContextManager] = None
        self.at_end: list[Callable[[], None]] = []

    def provides(self, module: nn.Module) -> bool:
        """Whether the module is in the plan; if so, its group is now held in full (a collective when
        another group was)."""
        index = self.group_of.get(id(module))
        if index is None:
            return False
        if index >= 0 and index != self.held_index:
            self.release()
            context = held_in_full(self.groups[index])
            context.__enter__()
            self._context, self.held_index = context, index
        return True

    def release(self) -> None:
        if self._context is not None:
            context, self._context, self.held_index = self._context, None, None
            context.__exit__(None, None, None)


def _parameters_of(module: nn.Module) -> Iterable[nn.Parameter]:
    """`module.parameters()`, read straight from its table when it has no children (as layers mostly
    have not): a plan lists them for every pass."""
    if module._modules:
        return module.parameters()
    return dict.fromkeys(p for p in module._parameters.values() if p is not None)  # one entry per tensor


_PLANS: list[_GatherPlan] = []


@contextlib.contextmanager
def gathering_in_order(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within it, `gathered(m)` for a module of `modules` (the order in which a pass reads them) gathers
    m's whole group of consecutive modules in one collective and holds it until a module of another group
    is read: far fewer collectives than one per module, at the peak memory of the largest module. Every
    rank must announce the same modules in the same order and read them in it."""
    plan = _GatherPlan(list(modules))
    _PLANS.append(plan)
    try:
        yield
    finally:
        _PLANS.remove(plan)
        plan.release()
        for callback in plan.at_end:
            callback()


def at_end_of_pass(callback: Callable[[], None]) -> bool:
    """Call `callback` when the innermost `gathering_in_order` ends; False (and no call) outside one."""
    if not _PLANS:
        return False
    _PLANS[-1].at_end.append(callback)
    return True


class LastModuleMemo(Generic[T]):
    """What was computed for the module read last, kept until another module is read or the pass ends:
    the networks that one walk evaluates together (`engine.walk`) read each module in turn."""

    def __init__(self) -> None:
        self._kept: Optional[tuple[str, T]] = None

    def get(self, name: str, compute: Callable[[], T]) -> T:
        if self._kept is not None and self._kept[0] == name:
            return self._kept[1]
        self._kept = None  # freed before the next module's value is computed
        value = compute()
        if at_end_of_pass(self._forget):
            self._kept = (name, value)
        return value

    def _forget(self) -> None:
        self._kept = None


def full(t: Optional[Tensor]) -> Optional[Tensor]:
    """The whole tensor behind a DTensor (a collective); any other tensor as it is."""
    return t.full_tensor() if t is not None and is_dtensor(t) else t


def _same_dtype(tensors: list[Tensor]) -> Iterator[list[int]]:
    """The positions of the tensors of each dtype and device among them: what one flat collective can carry."""
    for kind in dict.fromkeys((t.dtype, t.device) for t in tensors):
        yield [i for i, t in enumerate(tensors) if (t.dtype, t.device) == kind]


def from_rank_zero(tensors: list[Tensor]) -> list[Tensor]:
    """Rank 0's values of tensors every rank holds in full, in fresh tensors: one broadcast per dtype."""
    copies: list[Optional[Tensor]] = [None] * len(tensors)
    for chosen in _same_dtype(tensors):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in chosen])
        dist.broadcast(flat, src=0)
        for i, part in zip(chosen, flat.split([tensors[i].numel() for i in chosen])):
            copies[i] = part.view(tensors[i].shape)
    return copies  # type: ignore[return-value]


def rank_zero_value(value: float, device: torch.device) -> float:
    """Rank 0's value of a number every rank computed (one broadcast); the number itself on one process."""
    if world()[1] == 1:
        return value
    (agreed,) = from_rank_zero([torch.tensor([value], dtype=torch.float64, device=device)])
    return float(agreed)


def is_buffer_key(key: str) -> bool:
    return key.startswith("running_")


class ShardedSnapshot:
    """A frozen copy of the tensors of the affine modules of a graph, as a parameter source.

    With `sharded`, rank r keeps entries [r*c, (r+1)*c) of every flattened tensor (c = ceil(numel /
    world)), and reading a module gathers the pieces from all ranks (a collective); otherwise every
    rank keeps the full tensors and reading is local."""

    def __init__(self, pieces: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], sharded: bool,
                 world_size: int, rank: int):
        self.pieces, self.shapes, self.sharded = pieces, shapes, sharded
        self.world_size, self.rank = world_size, rank
        self._assembled: LastModuleMemo[dict[str, Tensor]] = LastModuleMemo()

    @classmethod
    def take(cls, modules: Mapping[str, nn.Module], source: "ParameterSource", sharded: bool) -> "ShardedSnapshot":
        """Copy the tensors of `modules` ({name: module}, read in this order) from `source`."""
        rank, size = world()
        pieces, shapes = {}, {}
        with torch.no_grad(), gathering_in_order(modules.values()):
            for name, module in modules.items():
                with source.tensors(name, module) as tensors:
                    for key, t in tensors.items():
                        if t is None:
                            continue
                        full_name = parameter_name(name, key)
                        shapes[full_name] = tuple(t.shape)
                        pieces[full_name] = _piece(t.detach(), rank, size) if sharded else t.detach().clone()
        return cls(pieces, shapes, sharded, size, rank)

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[dict[str, Optional[Tensor]]]:
        present = {}
        for key in tensor_names(module):
            full_name = parameter_name(name, key)
            if full_name not in self.pieces:
                if getattr(module, key, None) is not None:
                    raise ParameterMismatchError(f"the reference copy has no tensor {full_name!r} for module "
                                                 f"{name!r} ({type(module).__name__})")
                continue
            present[key] = full_name
        device = own_device(module)
        for full_name in present.values():  # restored from a checkpoint, a copy is on the CPU: it joins the model
            if device is not None and self.pieces[full_name].device != device:
                self.pieces[full_name] = self.pieces[full_name].to(device)
        if self.sharded:  # a collective; within a pass, the networks of one walk share it
            found = self._assembled.get(name, lambda: dict(zip(present, _assemble(
                [self.pieces[n] for n in present.values()], [self.shapes[n] for n in present.values()]))))
        else:
            found = {key: self.pieces[n] for key, n in present.items()}
        yield {key: found.get(key) for key in tensor_names(module)}

    def state_dict(self) -> dict:
        return {"pieces": dict(self.pieces), "shapes": dict(self.shapes), "sharded": self.sharded,
                "world_size": self.world_size, "rank": self.rank}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "ShardedSnapshot":
        """Refuses a sharded copy saved by another number of ranks, or by another rank: a strategy
        that saves callback states on rank 0 only hands rank 0's piece to every rank."""
        rank, size = world()
        if state["sharded"] and state["world_size"] != size:
            raise ValueError(f"this reference copy was saved sharded over {state['world_size']} ranks; it cannot be "
                             f"read with {size}")
        if state["sharded"] and state.get("rank") != rank:
            raise ValueError(f"rank {rank} was handed the piece of the reference copy that rank {state.get('rank')} "
                             f"saved: this checkpoint (or strategy) keeps callback states of one rank only, so a "
                             f"sharded reference cannot be restored from it")
        return cls(dict(state["pieces"]), {k: tuple(v) for k, v in state["shapes"].items()}, state["sharded"],
                   state["world_size"], rank)


def own_device(module: nn.Module) -> Optional[torch.device]:
    """The device of a module's own tensors (a layer's), None when it holds none."""
    own = next(itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)), None)
    return None if own is None else own.device


def _piece(t: Tensor, rank: int, size: int) -> Tensor:
    flat = t.reshape(-1)
    chunk = math.ceil(flat.numel() / size)
    piece = flat.new_zeros(chunk)
    mine = flat[rank * chunk:(rank + 1) * chunk]
    piece[:mine.numel()] = mine
    return piece


def _assemble(pieces: list[Tensor], shapes: list[tuple[int, ...]], group: Any = None) -> list[Tensor]:
    """The whole tensors from every rank's flat pieces of them (a tensor's pieces are of one length on
    every rank, rank 0's first), cut to their shapes: one all-gather per dtype among them."""
    size = dist.get_world_size(group=group)
    assembled: list[Optional[Tensor]] = [None] * len(pieces)
    for chosen in _same_dtype(pieces):
        mine = torch.cat([pieces[i] for i in chosen])  # every rank's pieces have the same lengths
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=group)
        per_rank = [part.split([pieces[i].numel() for i in chosen]) for part in parts]
        for k, i in enumerate(chosen):
            whole = torch.cat([split[k] for split in per_rank])
            assembled[i] = whole[:math.prod(shapes[i])].reshape(shapes[i])
    return assembled  # type: ignore[return-value]
