"""Pruning bounded by a path-metric budget (MATH.md sections 3 and 4).

One round removes weights in the order of their path-magnitude scores, re-scoring as it goes, and stops
at the largest set whose exact path-metric to the pre-round weights stays within the budget (or at a
count cap). For a pruning, theta' = theta * mask, the path-metric is exact:
||Phi(theta) - Phi(theta')||_1 = ||Phi(theta)||_1 - ||Phi(theta')||_1, and it only grows as more entries
go, so the largest prefix of a score order within the budget is found by bisection. Every quantity is
rescaling-invariant, so a function-preserving rescaling of the network leaves the masks unchanged.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .bounds import check_number
from .distributed import from_rank_zero, rank_zero_value, world
from .engine import model_device
from .graph import PathGraph
from .layers import parameter_name
from .logmath import exp_or_inf, log_difference
from .norms import norm_and_log
from .scores import check_scorable, scores_from
from .sources import ParameterSource, Tensors

Scope = Literal["global", "layer"]
Ramp = Literal["linear", "cubic"]


@dataclass(frozen=True)
class Certified:
    """A budget in output units: a round may change the network's outputs by at most `change` in l1 norm,
    for every input with ||x||_inf <= `input_bound` (the certificate of MATH.md section 3)."""

    change: float
    input_bound: float

    def __post_init__(self) -> None:
        check_number("Certified.change", self.change)
        check_number("Certified.input_bound", self.input_bound, strict=False)

    def relative_to(self, log_norm: float) -> float:
        """The same budget over the L1 path-norm exp(log_norm): change / (max(B, 1) * ||Phi||_1)."""
        # beyond float64 (a path-norm below 1e-308): every round fits
        return exp_or_inf(math.log(self.change) - math.log(max(self.input_bound, 1.0)) - log_norm)


Budget = Union[float, Certified]


def check_budget(budget: Budget) -> None:
    """A relative budget lies in (0, 1]; a `Certified` one checks itself."""
    if not isinstance(budget, Certified):
        check_number("budget", budget)
        if budget > 1:
            raise ValueError(f"budget is relative to the pre-round L1 path-norm and must lie in (0, 1], got "
                             f"{budget!r}; pass pathmonitor.Certified(change, input_bound) for a budget in output "
                             f"units")


def ramped_sparsity(position: int, start: int, end: int, target: float, ramp: Ramp = "cubic") -> float:
    """The sparsity scheduled at `position` (a step or epoch count): 0 at `start`, `target` from `end` on,
    rising linearly or cubically (fast first, then slowly: target * (1 - (1 - t)^3)) in between."""
    t = 1.0 if end <= start else min(1.0, max(0.0, (position - start) / (end - start)))
    return target * (t if ramp == "linear" else 1 - (1 - t) ** 3)


@dataclass(frozen=True)
class PruningRound:
    """The masks after one round (True = kept) and what the round cost.

    change_relative: ||Phi(theta_before) - Phi(theta_after)||_1 / ||Phi(theta_before)||_1, exact;
    log_norm_before: log ||Phi(theta_before)||_1, so that change = change_relative * exp(log_norm_before)."""

    masks: dict[str, Tensor]
    removed: int
    change_relative: float
    log_norm_before: float

    @property
    def change(self) -> float:
        """The round's exact path-metric ||Phi(theta_before) - Phi(theta_after)||_1 (inf beyond float64)."""
        if self.change_relative == 0:
            return 0.0
        return exp_or_inf(math.log(self.change_relative) + self.log_norm_before)


class MaskedSource:
    """Another source with the weights of some modules multiplied by boolean masks ({module name: mask})."""

    def __init__(self, source: ParameterSource, masks: Mapping[str, Tensor]):
        self.source, self.masks = source, masks

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[Tensors]:
        with self.source.tensors(name, module) as tensors:
            mask = self.masks.get(name)
            if mask is None:
                yield tensors
            else:
                yield {**tensors, "weight": tensors["weight"] * mask.to(tensors["weight"].device)}


def prune_round(graph: PathGraph, model: nn.Module, source: ParameterSource, masks: Mapping[str, Tensor],
                budget: Budget, max_removed: Optional[int] = None, scope: Scope = "global",
                chunks: int = 4) -> PruningRound:
    """One round of budgeted path-magnitude pruning of the weights named in `masks` ({module name: bool
    mask of its weight, True = kept}); the weights are read from `source` with the masks applied.

    Removes at most `max_removed` entries, and only as many as keep the exact path-metric between the
    pre-round and the post-round network within the budget: `budget` times the pre-round L1 path-norm,
    or a `Certified` change in output units. The order is re-scored `chunks` times: each chunk takes its
    share of what still fits. With scope="layer" the layers are visited in turn: each may add at most
    1/L of the budget to the change, and may remove at most its share of `max_removed` by size."""
    check_budget(budget)
    if max_removed is not None:
        check_number("max_removed", max_removed, integer=True, strict=False)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    check_number("chunks", chunks, integer=True)
    kept = {name: mask.clone() for name, mask in masks.items()}
    modules = list(kept)
    check_scorable(graph, model, modules)
    # every rank takes rank 0's numbers, so every rank makes the same decisions and ends with the same masks,
    # even where kernels that are not deterministic (on a GPU) make the ranks' passes differ in the last bits
    device = model_device(model)
    log_before = rank_zero_value(norm_and_log(graph, model, MaskedSource(source, kept), 1.0)[1], device)
    budget_relative = budget.relative_to(log_before) if isinstance(budget, Certified) else float(budget)

    def change_of(candidate: Mapping[str, Tensor]) -> float:
        _, log_after = norm_and_log(graph, model, MaskedSource(source, candidate), 1.0)
        return rank_zero_value(_relative_drop(log_before, log_after), device)

    groups = [modules] if scope == "global" else [[name] for name in modules]
    sizes = [sum(kept[name].numel() for name in group) for group in groups]
    removed = 0
    for group, size in zip(groups, sizes):
        # what this group may add: all of the budget globally, 1/L of it (and its share of the cap) per layer
        allowed = (change_of(kept) if len(groups) > 1 else 0.0) + budget_relative / len(groups)
        cap = None if max_removed is None else math.ceil(max_removed * size / sum(sizes))
        removed_here = 0
        for chunk in range(chunks):
            room = None if cap is None else min(cap - removed_here, max_removed - removed)
            if room == 0:
                break
            order = _ascending_candidates(graph, model, MaskedSource(source, kept), kept, group)
            if room is not None:
                order = order.first(room)
            fits = _largest_fitting_prefix(order, kept, change_of, allowed)
            take = fits if chunk == chunks - 1 else math.ceil(fits / (chunks - chunk))
            if take == 0:
                break
            _remove(kept, order.first(take))
            removed, removed_here = removed + take, removed_here + take
    return PruningRound(kept, removed, change_of(kept), log_before)


def _relative_drop(log_before: float, log_after: float) -> float:
    """(N_before - N_after) / N_before from the logarithms, exact at any magnitude."""
    if log_before == -math.inf:
        return 0.0
    return math.exp(log_difference(log_before, log_after) - log_before)


@dataclass(frozen=True)
class Candidates:
    """Kept entries in removal order: entry k is flat index `indices[k]` of a weight of `names`; the first
    `count` entries count. Per module, the order positions of its entries are kept sorted, so that any
    prefix splits into per-module index lists without scanning it."""

    names: list[str]
    indices: Tensor
    count: int
    positions: tuple[Tensor, ...]

    @classmethod
    def ordered(cls, names: list[str], modules: Tensor, indices: Tensor) -> "Candidates":
        """From the entries in order: entry k belongs to the weight of `names[modules[k]]`."""
        positions = tuple((modules == m).nonzero().flatten() for m in range(len(names)))
        return cls(names, indices, len(indices), positions)

    def __len__(self) -> int:
        return self.count

    def first(self, count: int) -> "Candidates":
        return Candidates(self.names, self.indices, min(count, self.count), self.positions)

    def per_module(self) -> Iterator[tuple[str, Tensor]]:
        """(module name, flat indices of its weight) for the entries of this prefix."""
        for name, positions in zip(self.names, self.positions):
            taken = int(torch.searchsorted(positions, self.count))
            if taken:
                yield name, self.indices[positions[:taken]]


def _ascending_candidates(graph: PathGraph, model: nn.Module, source: ParameterSource, kept: Mapping[str, Tensor],
                          group: list[str]) -> Candidates:
    """The kept entries of `group`'s weights, lowest path-magnitude score first."""
    scores, _ = scores_from(graph, model, source, group)
    if world()[1] > 1:  # rank 0's scores: one order on every rank (see prune_round)
        scores = dict(zip(scores, from_rank_zero(list(scores.values()))))
    flat_scores, modules, indices = [], [], []
    for position, name in enumerate(group):
        alive = kept[name].reshape(-1).nonzero().flatten().cpu()
        score = scores[parameter_name(name, "weight")].detach().reshape(-1).to("cpu", torch.float64)
        flat_scores.append(score[alive])
        modules.append(torch.full_like(alive, position))
        indices.append(alive)
    order = torch.sort(torch.cat(flat_scores), stable=True).indices  # stable: ties in layer order, on every rank
    return Candidates.ordered(group, torch.cat(modules)[order], torch.cat(indices)[order])


def _largest_fitting_prefix(order: Candidates, kept: Mapping[str, Tensor], change_of, allowed: float) -> int:
    """The largest k such that removing the first k candidates keeps the change within `allowed`
    (bisection: the change only grows with k). The whole order is tried first: when a count cap, not
    the budget, limits the round, one pass decides."""
    low, high = 0, len(order)
    if high and _fits(order, kept, change_of, allowed):
        return high
    high -= 1
    while low < high:
        middle = (low + high + 1) // 2
        if _fits(order.first(middle), kept, change_of, allowed):
            low = middle
        else:
            high = middle - 1
    return low


def _fits(entries: Candidates, kept: Mapping[str, Tensor], change_of, allowed: float) -> bool:
    candidate = {name: mask.clone() for name, mask in kept.items()}
    _remove(candidate, entries)
    return change_of(candidate) <= allowed


def _remove(masks: dict[str, Tensor], entries: Candidates) -> None:
    for name, chosen in entries.per_module():
        masks[name].view(-1)[chosen.to(masks[name].device)] = False
