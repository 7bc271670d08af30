"""The monitors in real training runs: one process, DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 (2 CPU processes, gloo).

Each strategy trains once per test session (tests/training_run.py, started as a script so that Lightning's launchers can
start the second rank); every check reads that run's event files, checkpoints and per-rank records.
"""
from __future__ import annotations

import math

import pytest
import torch

import pathmonitor as pm
from shared_runs import SHAPE, close, records, scalars, weights

STRATEGIES = ["single", "ddp", "zero1", "zero2", "zero3", "fsdp2"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_logged_values_equal_the_library_on_the_final_weights(runs, strategy):
    out = runs(strategy)
    ranks = records(out)
    assert len(ranks) == (1 if strategy == "single" else 2)
    for other in ranks[1:]:  # identical on every rank, to the last bit
        for key in ("norm", "drift_init", "drift_checkpoint", "bound", "n_samples", "input_bound"):
            assert other[key] == ranks[0][key], key
    record, logged, model = ranks[0], scalars(out), weights(out, strategy)
    step = record["global_step"]
    init = torch.load(out / "init.pt")
    with torch.no_grad():
        expected = {
            "pathnorm/l1": float(pm.path_norm(model, SHAPE, 1)),
            "pathnorm/l2": float(pm.path_norm(model, SHAPE, 2)),
            "pathmetric/drift": pm.path_metric(model, init, SHAPE).value,
            "bound/value": pm.generalization_bound(model, SHAPE, n_samples=480, input_bound=1.0).value,
        }
    kept = {**record["norm"], **record["drift_init"], **record["bound"]}
    for tag, value in expected.items():
        assert close(kept[tag], value, 1e-9), (tag, kept[tag], value)
        assert close(logged[tag][step], value, 1e-6), (tag, logged[tag][step], value)
    assert record["n_samples"] == 480 and record["input_bound"] == 1.0
    assert close(logged["pathnorm/log10_l1"][step], math.log10(expected["pathnorm/l1"]), 1e-6)
    # cadence: right after every 4th optimizer step, never at step 0
    assert sorted(logged["pathnorm/l1"]) == list(range(4, step + 1, 4))
    # the checkpoint drift is logged at each save: the three epoch ends and the final save coincide at 24
    assert sorted(logged["pathmetric_checkpoint/drift"]) == [8, 16, 24]
    assert set(logged) >= {"pathmetric/drift_relative", "pathmetric/exact", "pathmetric/certified_change",
                           "bound/log10_value", "bound/first_part", "bound/gap"}


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_sharded_strategies_really_shard(runs, strategy):
    for record in records(runs(strategy)):
        assert record["sharded"], "no step was probed"
        assert all(sharded == total for sharded, total in record["sharded"]), record["sharded"]


def test_zero3_gathers_consecutive_modules_together_within_the_largest_module_size(runs):
    """One path-norm evaluation gathers groups of modules, one collective per group (all parameters are
    float32), far fewer than one per module, and never holds more entries at once than the largest
    module has."""
    for record in records(runs("zero3")):
        gathered, modules = record["gathers"]["gathered"], record["gathers"]["modules"]
        assert len(modules) == 9 and 0 < len(gathered) <= len(modules) // 2, record["gathers"]
        assert max(gathered) <= max(modules) and sum(gathered) == sum(modules)
        assert record["gathers"]["collectives"] == len(gathered), record["gathers"]


@pytest.mark.parametrize("strategy", ["single", "zero3"])
def test_killed_and_resumed_run_logs_the_uninterrupted_drift_series(runs, strategy):
    whole = scalars(runs(strategy))
    killed = runs(strategy, "--stop-at", "8")  # killed as step 9 starts; its last checkpoint is step 8's
    resumed_run = runs(strategy, "--resume", str(killed / "ckpt" / "epoch=0-step=8.ckpt"))
    before, resumed = scalars(killed), scalars(resumed_run)
    for tag in ("pathmetric/drift", "pathmetric_checkpoint/drift", "pathnorm/l1"):
        assert min(resumed[tag]) > 8, (tag, resumed[tag])  # nothing again at the checkpoint's step
        stitched = {**{s: v for s, v in before[tag].items() if s <= 8},
                    **{s: v for s, v in resumed[tag].items() if s > 8}}
        assert stitched.keys() == whole[tag].keys(), tag
        for s, value in whole[tag].items():
            assert close(stitched[s], value, 1e-6), (tag, s, stitched[s], value)
    # the references themselves: "init" restored from the checkpoint (each rank's shard under ZeRO-3),
    # "last_checkpoint" the weights resumed from
    init, at_8 = torch.load(killed / "init.pt"), weights(killed, strategy, "epoch=0-step=8.ckpt")
    at_16 = weights(resumed_run, strategy, "epoch=1-step=16.ckpt")
    with torch.no_grad():
        assert close(resumed["pathmetric/drift"][16], pm.path_metric(at_16, init, SHAPE).value, 1e-6)
        assert close(resumed["pathmetric_checkpoint/drift"][16],
                     pm.path_metric(at_16, at_8.state_dict(), SHAPE).value, 1e-6)
