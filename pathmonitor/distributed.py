"""Full tensors of one module at a time while training is sharded (DESIGN.md layer 4).

- Single process, DDP, DeepSpeed ZeRO-1/2: every rank holds full parameters; nothing to gather.
- DeepSpeed ZeRO-3: every rank holds an empty partition (`p.ds_numel` entries in all, `p.numel() == 0`);
  `deepspeed.zero.GatheredParameters` assembles one module's parameters and frees them on exit.
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
import math
from typing import TYPE_CHECKING, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ParameterMismatchError
from .layers import parameter_name, tensor_names

if TYPE_CHECKING:
    from .sources import ParameterSource


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
    return any(cls.__name__ == name for cls in type(obj).__mro__)


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
    children too: an affine module's only children are parametrizations, whose `original` it reads."""
    partitioned = [p for p in module.parameters() if is_zero3_parameter(p)]
    if not partitioned:
        yield
        return
    import deepspeed  # only reached when DeepSpeed made the parameters

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full(t: Optional[Tensor]) -> Optional[Tensor]:
    """The whole tensor behind a DTensor (a collective); any other tensor as it is."""
    return t.full_tensor() if t is not None and is_dtensor(t) else t


def from_rank_zero(t: Tensor) -> Tensor:
    """Rank 0's value of a tensor every rank holds in full (a broadcast into a fresh tensor)."""
    copy = t.detach().clone()
    dist.broadcast(copy, src=0)
    return copy


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

    @classmethod
    def take(cls, modules: Mapping[str, nn.Module], source: "ParameterSource", sharded: bool) -> "ShardedSnapshot":
        """Copy the tensors of `modules` ({name: module}, read in this order) from `source`."""
        rank, size = world()
        pieces, shapes = {}, {}
        with torch.no_grad():
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
        found = {}
        for key in tensor_names(module):
            full_name = parameter_name(name, key)
            if full_name not in self.pieces:
                if getattr(module, key, None) is not None:
                    raise ParameterMismatchError(f"the reference copy has no tensor {full_name!r} for module "
                                                 f"{name!r} ({type(module).__name__})")
                found[key] = None
                continue
            piece = self.pieces[full_name]
            found[key] = _assemble(piece, self.shapes[full_name]) if self.sharded else piece
        yield found

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


def _piece(t: Tensor, rank: int, size: int) -> Tensor:
    flat = t.reshape(-1)
    chunk = math.ceil(flat.numel() / size)
    piece = flat.new_zeros(chunk)
    mine = flat[rank * chunk:(rank + 1) * chunk]
    piece[:mine.numel()] = mine
    return piece


def _assemble(piece: Tensor, shape: tuple[int, ...]) -> Tensor:
    _, size = world()
    parts = [torch.empty_like(piece) for _ in range(size)]
    dist.all_gather(parts, piece.contiguous())
    return torch.cat(parts)[:math.prod(shape)].reshape(shape)
