"""`PathBudgetPruning` in the shared training runs (tests/training_run.py: Adam, rounds at steps 6 and 12
rewinding the survivors to step 2, 24 steps): one process, DDP and DeepSpeed ZeRO-1/2/3 with 2 CPU processes,
ZeRO-3 both with every parameter partitioned and with DeepSpeed's default persistence threshold, under
which it keeps this small net's parameters gathered between steps."""
from __future__ import annotations

import pytest
import torch

from shared_runs import records, scalars, weights

STRATEGIES = ["single", "ddp", "zero1", "zero2", "zero3", "zero3_persistent"]


def masks_of(out, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"masks{rank}.pt")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pruned_entries_stay_zero_in_the_consolidated_checkpoint_and_masks_agree_across_ranks(runs, strategy):
    out = runs(strategy)
    masks = masks_of(out)
    for rank in range(1, len(records(out))):
        other = masks_of(out, rank)
        assert other.keys() == masks.keys() and all(torch.equal(other[k], masks[k]) for k in masks), rank
    for checkpoint in ("epoch=1-step=16.ckpt", "final.ckpt"):  # 4 and 12 Adam steps after the last round
        state = weights(out, strategy, checkpoint).net.state_dict()
        for name, mask in masks.items():
            assert torch.all(state[f"{name}.weight"][~mask] == 0), (checkpoint, name)
            assert torch.all(state[f"{name}.weight"][mask] != 0), (checkpoint, name)  # survivors rewound, trained
    zeros = sum(int((state[f"{name}.weight"] == 0).sum()) for name in masks)
    total = sum(mask.numel() for mask in masks.values())
    logged = scalars(out)["prune/sparsity"]
    assert sorted(logged) == [6, 12]
    assert logged[12] == pytest.approx(zeros / total, abs=1e-7)  # float32 in the event file
    for record in records(out):
        assert [r["step"] for r in record["pruning_rounds"]] == [6, 12]
        assert record["pruning_rounds"][-1]["prune/sparsity"] == zeros / total
        assert all(0 < r["prune/change_relative"] <= 0.3 for r in record["pruning_rounds"])
        assert all(r["live_nonzero"] == 0 for r in record["pruning_rounds"])  # what the next forward reads


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adam_state_of_pruned_entries_stays_zero_on_every_rank(runs, strategy):
    # masked gradients and state leave Adam's moments at pruned entries zero; a moment left there
    # would move the weight again at every step
    for record in records(runs(strategy)):
        assert record["pruned_state_nonzero"] == 0


@pytest.mark.parametrize("strategy", ["single", "zero3"])
def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_masks(runs, strategy):
    whole = runs(strategy)
    killed = runs(strategy, "--stop-at", "8")  # between the two rounds; the last checkpoint is step 8's
    resumed = runs(strategy, "--resume", str(killed / "ckpt" / "epoch=0-step=8.ckpt"))
    expected, found = masks_of(whole), masks_of(resumed)
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(expected[name], found[name]), name
    assert scalars(resumed)["prune/sparsity"][12] == scalars(whole)["prune/sparsity"][12]


def test_parameters_deepspeed_keeps_gathered_stay_gathered_after_the_monitors(runs):
    """Under DeepSpeed's default persistence threshold every parameter of this net stays gathered between
    steps; the monitors (probed right after them, at every step they evaluate) and the pruning rounds read
    them as they are and leave them so, rather than partition them behind DeepSpeed's back."""
    for record in records(runs("zero3_persistent")):
        assert record["sharded"] and all(sharded == 0 for sharded, _ in record["sharded"]), record["sharded"]
