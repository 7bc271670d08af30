"""Parameter sources and reference copies across 2 real processes (gloo), without Lightning."""
from __future__ import annotations

import os
import tempfile
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pathmonitor as pm
from pathmonitor.distributed import ShardedSnapshot
from pathmonitor.graph import capture
from pathmonitor.pruning import prune_round
from pathmonitor.scores import scores_from
from pathmonitor.sources import ModuleSource
from pathmonitor.tracking import TrackedModel

SHAPE = (2, 5, 5)


def odd_net() -> nn.Module:
    """Tensor sizes that do not divide by the number of ranks, a 1-entry bias, batch-norm buffers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 1))


def _worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net = odd_net()
        bn = net[1]
        with torch.no_grad():  # each rank's running statistics differ, as under DeepSpeed
            bn.running_mean.fill_(0.1 * (rank + 1))
            bn.running_var.fill_(1.0 + rank)
        tracked = TrackedModel(net, SHAPE, synchronized=True)
        reference = ShardedSnapshot.take({name: net.get_submodule(name) for name in ("0", "1", "4")},
                                         tracked.source, sharded=True)
        sizes = {key: piece.numel() for key, piece in reference.pieces.items()}
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.5)
        metric = tracked.at("after").path_metric(reference)
        restored = ShardedSnapshot.from_state_dict(reference.state_dict())
        same = tracked.at("again").path_metric(restored)
        wrong_rank = dict(reference.state_dict(), rank=1 - rank)
        try:
            ShardedSnapshot.from_state_dict(wrong_rank)
            refused = ""
        except ValueError as error:
            refused = str(error)
        results[rank] = dict(value=metric.value, kind=metric.kind, restored=same.value, sizes=sizes,
                             norm=tracked.path_norm(1).value, refused=refused,
                             masks=_pruned_with_other_passes(net, rank))
    finally:
        dist.destroy_process_group()


def _pruned_with_other_passes(net: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """A pruning round in which rank 1's passes differ from rank 0's: its own running statistics, and its
    scores in the reverse order (as kernels that are not deterministic could make them, near ties)."""
    masks = {name: torch.ones_like(net.get_submodule(name).weight, dtype=torch.bool) for name in ("0", "4")}
    own = ModuleSource(net, buffers_from_rank_zero=False)

    def reversed_scores(*args):
        scores, log_norm = scores_from(*args)
        return {key: -score for key, score in scores.items()}, log_norm

    with mock.patch("pathmonitor.pruning.scores_from", reversed_scores if rank == 1 else scores_from):
        return prune_round(capture(net, SHAPE), net, own, masks, 0.3).masks


@pytest.fixture(scope="module")
def two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), results), nprocs=2, join=True)
        return dict(results)


def test_sharded_reference_gives_the_single_process_metric_on_every_rank(two_ranks):
    net = odd_net()
    with torch.no_grad():
        net[1].running_mean.fill_(0.1)  # rank 0's statistics are the ones every rank reads
        net[1].running_var.fill_(1.0)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        for p in net.parameters():
            p.mul_(0.5)
        expected = pm.path_metric(net, before, SHAPE)
        norm = float(pm.path_norm(net, SHAPE))
    for rank in (0, 1):
        result = two_ranks[rank]
        assert result["kind"] == expected.kind == "pruning"
        assert result["value"] == pytest.approx(expected.value, rel=1e-12)
        assert result["restored"] == result["value"]
        assert result["norm"] == pytest.approx(norm, rel=1e-12)
    # each rank keeps ceil(n / 2) entries of every tensor, not the whole: 27 -> 14, the bias of 1 -> 1
    assert two_ranks[0]["sizes"]["4.weight"] == 14 and two_ranks[0]["sizes"]["4.bias"] == 1
    assert two_ranks[0]["sizes"]["0.weight"] == 27


def test_a_piece_saved_by_another_rank_is_refused(two_ranks):
    for rank in (0, 1):
        assert f"rank {rank} was handed the piece" in two_ranks[rank]["refused"]


def test_a_pruning_round_gives_every_rank_rank_zeros_masks(two_ranks):
    """Every rank takes rank 0's scores and pass totals, so the ranks' masks agree even where their own
    passes would not (here: other running statistics and a reversed order on rank 1)."""
    masks = [two_ranks[rank]["masks"] for rank in (0, 1)]
    assert masks[0].keys() == masks[1].keys()
    assert any(not bool(mask.all()) for mask in masks[0].values())
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name
