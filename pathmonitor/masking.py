"""Pruning masks kept in force everywhere a training step reads a weight (DESIGN.md layer 4).

A pruned entry stays exactly zero only if it is zero in the live weight, in the optimizer's master copy
(which DeepSpeed copies back into the live weight after every step), in the gradient the step reads, and
in the optimizer state: Adam's moments would otherwise move it again. Where those live:
- one process, DDP: the parameter itself, `p.grad` and `optimizer.state[p]`;
- DeepSpeed ZeRO-1/2: full live weights on every rank, while each rank owns one fragment of the fp32
  master copy, of the reduced gradient and of the optimizer state (`p._hp_mapping`);
- DeepSpeed ZeRO-3: each rank owns entries [r*c, (r+1)*c) of the flattened parameter (c =
  `p.ds_tensor.numel()`) in the live partition, the master copy, the gradient and the state.
Every rank masks what it owns, so enforcing a mask needs no collective; reading or writing whole weights
(for rewinding) does. `mask_keeper(trained)` picks the right keeper for the model as the strategy wraps it.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .distributed import has_class_named, is_zero3_parameter, zero3_partition_size, zero3_piece

Masks = Mapping[str, Tensor]  # {name: bool mask of the weight's shape, True = kept}
Weights = Mapping[str, nn.Parameter]


class MaskKeeper(Protocol):
    def weights(self, weights: Weights, masks: Masks) -> None:
        """Zero the pruned entries of the live weights and of the master copy."""

    def gradients(self, weights: Weights, masks: Masks) -> None:
        """Zero the pruned entries of the gradients the next optimizer step reads."""

    def optimizer_state(self, weights: Weights, masks: Masks, reset: bool) -> None:
        """Zero the optimizer state of the pruned entries; with `reset`, start every entry's state afresh,
        step counts included (DeepSpeed counts steps per parameter group, which go on)."""

    def read(self, weights: Weights) -> dict[str, Tensor]:
        """Full copies of the weights, as the optimizer holds them (a collective under DeepSpeed)."""

    def write(self, weights: Weights, values: Mapping[str, Tensor], masks: Masks) -> None:
        """Set the weights to `values` times the masks, live and master copy."""


def mask_keeper(trained: nn.Module, optimizers: Iterable[Optimizer]) -> MaskKeeper:
    """The keeper for `trained`, the model as the strategy wraps it, trained by `optimizers`. Raises
    ValueError for the DeepSpeed set-ups whose copies it cannot reach."""
    if has_class_named(trained, "DeepSpeedEngine"):
        check_deepspeed(trained)
        return DeepSpeedMaskKeeper(trained.optimizer)
    return PlainMaskKeeper(list(optimizers))


def check_deepspeed(engine) -> None:
    """ZeRO stages 1 to 3 only: stage 0 keeps an fp16 master copy (or torch's own optimizer) out of the
    fragments' reach, and round-robin gradient partitioning orders the flat buffers differently from
    the fragment addresses."""
    stage = engine.zero_optimization_stage()
    if stage == 0:
        raise ValueError("masks are kept under DeepSpeed ZeRO stages 1, 2 and 3; this engine runs stage 0")
    if getattr(engine.optimizer, "round_robin_gradients", False):
        raise ValueError("masks cannot be kept with DeepSpeed's round_robin_gradients: set it to false")


class PlainMaskKeeper:
    """Parameters held in full (one process, DDP), with their gradients and optimizer state."""

    def __init__(self, optimizers: list[Optimizer]):
        self.optimizers = optimizers

    @torch.no_grad()
    def weights(self, weights: Weights, masks: Masks) -> None:
        for name, p in weights.items():
            p.mul_(masks[name].to(p.device))

    @torch.no_grad()
    def gradients(self, weights: Weights, masks: Masks) -> None:
        for name, p in weights.items():
            if p.grad is not None:
                p.grad.mul_(masks[name].to(p.grad.device))

    @torch.no_grad()
    def optimizer_state(self, weights: Weights, masks: Masks, reset: bool) -> None:
        for optimizer in self.optimizers:
            for name, p in weights.items():
                if p not in optimizer.state:
                    continue
                if reset:
                    optimizer.state[p] = fresh_state(optimizer, p)
                    continue
                for value in optimizer.state[p].values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        value.mul_(masks[name].to(value.device))

    def read(self, weights: Weights) -> dict[str, Tensor]:
        return {name: p.detach().clone() for name, p in weights.items()}

    @torch.no_grad()
    def write(self, weights: Weights, values: Mapping[str, Tensor], masks: Masks) -> None:
        for name, p in weights.items():
            p.copy_(values[name].to(p.device) * masks[name].to(p.device))


def fresh_state(optimizer: Optimizer, p: nn.Parameter) -> dict[str, Any]:
    """The state `optimizer` starts `p` with: that of a new optimizer of its class, with the settings of
    `p`'s group, over a tensor like `p`. Zeroing the old state is no fresh start for all of them (NAdam's
    momentum product starts at 1, Rprop's step sizes at lr). Most create it at their first step, from
    none: so does one whose constructor does not take its own settings back."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    settings = {key: group[key] for key in optimizer.defaults if key in group}  # not a scheduler's initial_lr
    try:
        twin = type(optimizer)([torch.empty_like(p)], **settings)
    except TypeError:
        return {}
    return dict(next(iter(twin.state.values()), {}))


class DeepSpeedMaskKeeper:
    """DeepSpeed ZeRO-1/2/3: each rank masks the fragments of the master copy, gradient and optimizer
    state it owns (and, under ZeRO-3, its partition of the live weight, plus the full data of parameters
    DeepSpeed keeps gathered); ZeRO-1/2 live weights are full on every rank. ZeRO-3's pieces are read and
    written back through DeepSpeed's local accessors, which copy when the optimizer is offloaded; ZeRO-1/2
    fragments are views into its flat buffers."""

    def __init__(self, optimizer):
        self.optimizer = optimizer  # DeepSpeed's ZeRO optimizer
        self._pieces: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (mask, this rank's part of it)

    def _piece(self, name: str, p: nn.Parameter, mask: Tensor) -> Tensor:
        """This rank's ZeRO-3 part of `mask`, cut once per mask: the gradients need it at every step."""
        cached = self._pieces.get(name)
        if cached is None or cached[0] is not mask:
            cached = self._pieces[name] = (mask, zero3_piece(p, mask))
        return cached[1]

    @torch.no_grad()
    def weights(self, weights: Weights, masks: Masks) -> None:
        for name, p in weights.items():
            if is_zero3_parameter(p):
                from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

                piece = self._piece(name, p, masks[name])
                _edit_zero3_live(p, lambda part: part.mul_(piece.to(part.device)), lambda whole: whole.mul_(
                    masks[name].to(whole.device)))
                _mask_through(safe_get_local_fp32_param(p), lambda v: safe_set_local_fp32_param(p, v), piece)
            else:
                p.mul_(masks[name].to(p.device))  # through the parameter: its version counter moves
                if _owns_fragment(p):
                    master = p._hp_mapping.get_hp_fragment()
                    master.mul_(_fragment_of(p, masks[name]).to(master.device))

    @torch.no_grad()
    def gradients(self, weights: Weights, masks: Masks) -> None:
        for name, p in weights.items():
            if p.grad is not None:  # where DeepSpeed's own safe_get_full_grad looks first
                p.grad.mul_(masks[name].to(p.grad.device))
            elif is_zero3_parameter(p):
                from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

                _mask_through(safe_get_local_grad(p), lambda v: safe_set_local_grad(p, v),
                              self._piece(name, p, masks[name]))
            elif _owns_fragment(p):
                grad = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
                grad.mul_(_fragment_of(p, masks[name]).reshape(grad.shape).to(grad.device))
                self._refresh_offloaded_norm(p, grad)

    def _refresh_offloaded_norm(self, p: nn.Parameter, grad: Tensor) -> None:
        """With the optimizer offloaded, ZeRO-1/2 computes each gradient's norm during backward and clips
        with it: it must be the masked gradient's."""
        norms = getattr(self.optimizer, "norm_for_param_grads", None)
        if getattr(self.optimizer, "cpu_offload", False) and norms is not None:
            key = self.optimizer.get_param_id(p)
            if key in norms:
                norms[key] = grad.double().norm(2).to(norms[key].dtype)

    @torch.no_grad()
    def optimizer_state(self, weights: Weights, masks: Masks, reset: bool) -> None:
        for name, p in weights.items():
            if is_zero3_parameter(p):
                from deepspeed.utils import safe_get_local_optimizer_state, safe_set_local_optimizer_state

                keep = (torch.zeros(zero3_partition_size(p), dtype=torch.bool) if reset
                        else self._piece(name, p, masks[name]))
                for key in _zero3_state_keys(p):
                    _mask_through(safe_get_local_optimizer_state(p, key),
                                  lambda v, key=key: safe_set_local_optimizer_state(p, v, key), keep)
            elif _owns_fragment(p):
                keep = _fragment_of(p, masks[name])
                for state in self._state_fragments(p):
                    state.mul_(0 if reset else keep.to(state.device))

    def _state_fragments(self, p: nn.Parameter) -> list[Tensor]:
        """Views of this rank's fragment of `p` in every per-entry optimizer state (Adam's moments), taken
        from the optimizer's state itself: DeepSpeed's cached views are dropped when it relinks."""
        mapping = p._hp_mapping
        flat = self.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
        address = mapping.hp_fragment_address
        return [value.narrow(0, address.start, address.numel)
                for value in self.optimizer.optimizer.state.get(flat, {}).values()
                if isinstance(value, Tensor) and value.shape == flat.shape]

    def read(self, weights: Weights) -> dict[str, Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        values = {}
        for name, p in weights.items():
            value = safe_get_full_fp32_param(p)
            if value is None:
                raise ValueError(f"DeepSpeed keeps no fp32 master copy of {name}.weight (frozen, or not handed to "
                                 f"the optimizer), so it cannot be read back whole")
            values[name] = value.detach().clone()
        return values

    @torch.no_grad()
    def write(self, weights: Weights, values: Mapping[str, Tensor], masks: Masks) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        for name, p in weights.items():
            value = values[name].to(torch.float32) * masks[name].to(values[name].device)
            if is_zero3_parameter(p):
                # the full setter narrows an unpadded value: it fails on the last rank for odd sizes
                piece = zero3_piece(p, value)
                safe_set_local_fp32_param(p, piece)
                _edit_zero3_live(p, lambda part: part.copy_(piece),
                                 lambda whole: whole.copy_(value.reshape(whole.shape)))
            else:
                safe_set_full_fp32_param(p, value)
                p.copy_(value.to(p.device, p.dtype))


def _edit_zero3_live(p: nn.Parameter, edit_partition, edit_whole) -> None:
    """Apply an in-place edit to the live weight of a ZeRO-3 parameter: its partition, and its full data
    where DeepSpeed keeps it gathered (parameters below stage3_param_persistence_threshold, re-gathered
    only after the next step). A secondary (hpZ) copy of the partition is dropped, as DeepSpeed does
    when a partition changes, so that the next gather reads the edited one."""
    edit_partition(p.ds_tensor)
    if p.numel() == p.ds_numel:  # gathered now: the full data is what the next forward reads
        edit_whole(p.data)
    if getattr(p, "ds_secondary_tensor", None) is not None:
        p.ds_secondary_tensor = None


def _mask_through(value: Tensor | None, write, keep: Tensor) -> None:
    if value is not None:
        write(value * keep.to(value.device, value.dtype))


def _owns_fragment(p: nn.Parameter) -> bool:
    """Whether this rank owns a ZeRO-1/2 fragment of `p` (its master copy, gradient and state)."""
    return getattr(p, "_hp_mapping", None) is not None


def _fragment_of(p: nn.Parameter, full: Tensor) -> Tensor:
    """The entries of `full` in this rank's ZeRO-1/2 fragment of the parameter."""
    address = p._hp_mapping.lp_fragment_address
    return full.reshape(-1)[address.start:address.start + address.numel]


def _zero3_state_keys(p: nn.Parameter) -> list[str]:
    """The per-entry optimizer state keys (Adam's exp_avg, exp_avg_sq, ...) of the ZeRO-3 optimizer."""
    optimizer = p._z3_optimizer
    keys: dict[str, None] = {}
    for flat in optimizer.fp32_partitioned_groups_flat:
        for key, value in optimizer.optimizer.state.get(flat, {}).items():
            if isinstance(value, Tensor) and value.shape == flat.shape:
                keys[key] = None
    return list(keys)
