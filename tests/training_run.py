"""A short digits training run with the three monitors and budgeted pruning, for the end-to-end tests.

Run as a script (Lightning's DDP and DeepSpeed launchers start the other ranks by running it again):
    python tests/training_run.py STRATEGY OUT_DIR [--max-steps N] [--stop-at N] [--resume CKPT]
STRATEGY is one of single, ddp, zero1, zero2, zero3, zero3_persistent, fsdp2 (2 CPU processes for all
but single).
Every rank writes OUT_DIR/rank{r}.json with the monitors' float64 values, every pruning round's values
and how many parameters it held only a part of at every step, and its pruning masks to OUT_DIR/masks{r}.pt.
Pruning (Adam; rounds at steps 6 and 12, rewinding the survivors to step 2) runs on every strategy but
FSDP2, which it does not support. TensorBoard event files go to OUT_DIR/tb, checkpoints (one per
epoch and one at the end) to OUT_DIR/ckpt.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, DistributedSampler

import pathmonitor as pm
from pathmonitor import distributed
from pathmonitor.callbacks import GeneralizationBoundMonitor, PathBudgetPruning, PathMetricDrift, PathNormMonitor
from pathmonitor.callbacks.digits import DigitsData, DigitsNet
from pathmonitor.graph import capture

EVERY = 4  # monitor cadence in steps
BATCH = 64  # over all ranks: 8 steps per epoch on 480 training samples, whatever the number of ranks


def strategy_for(name: str):
    if name == "single":
        return "auto", 1
    if name == "ddp":
        return "ddp", 2
    if name == "fsdp2":
        from pytorch_lightning.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False), 2
    from pathmonitor.strategies import CPUDeepSpeedStrategy

    # threshold 0: every parameter really sharded under ZeRO-3, however small; "zero3_persistent" keeps
    # DeepSpeed's default, under which every parameter of this small net stays gathered between steps
    threshold = {} if name.endswith("_persistent") else {"stage3_param_persistence_threshold": 0}
    config = {"zero_optimization": {"stage": int(name[4]), **threshold},
              "zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": BATCH // 2}
    return CPUDeepSpeedStrategy(config=config, logging_level=40), 2


class UnshuffledDigits(DigitsData):
    """The digits in a fixed order on every rank and in every epoch. Lightning resumed from an
    epoch-end checkpoint sets the sampler's epoch one higher than an uninterrupted run does (and always
    shuffles a training set it shards), so only an unshuffled order lets both runs see the same batches."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.train_set, shuffle=False) if dist.is_initialized() else None
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)


class FullyShardedDigitsNet(DigitsNet):
    """DigitsNet with every layer's parameters sharded by FSDP2 (DTensors) across the data-parallel ranks."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class ShardingProbe(Callback):
    """Counts, at every step, the parameters this rank holds only a part of: an empty ZeRO-3 partition,
    or an FSDP2 DTensor whose local shard is smaller than the whole."""

    def __init__(self) -> None:
        self.sharded: list[tuple[int, int]] = []  # (sharded parameters, parameters)
        self.gathers: dict[str, list[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        params = list(pl_module.parameters())
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP2: this rank's shard
        self.sharded.append((sum(p.numel() == 0 or t.numel() < p.numel() for p, t in zip(params, local)),
                             len(params)))

    def on_train_end(self, trainer, pl_module) -> None:
        """Under ZeRO-3, the entries every gather of one path-norm evaluation assembles and the collectives
        it makes, beside the entries of each module the evaluation reads."""
        if not any(hasattr(p, "ds_id") for p in pl_module.parameters()):
            return
        gathered, collectives = [], []
        hold, all_gather = distributed.held_in_full, distributed.dist.all_gather

        def counted_hold(params):
            gathered.append(sum(p.ds_numel for p in params))
            return hold(params)

        def counted_all_gather(*args, **kwargs):
            collectives.append(1)
            return all_gather(*args, **kwargs)

        with mock.patch.object(distributed, "held_in_full", counted_hold), \
                mock.patch.object(distributed.dist, "all_gather", counted_all_gather):
            pm.path_norm(pl_module, (1, 8, 8))  # a collective: every rank evaluates
        modules = [pl_module.get_submodule(name) for name in capture(pl_module, (1, 8, 8)).affine_modules()]
        self.gathers = {"gathered": gathered, "collectives": len(collectives),
                        "modules": [sum(p.ds_numel for p in m.parameters()) for m in modules]}


class PruningRounds(Callback):
    """Every pruning round's logged values, with its step and the number of pruned entries the live
    weights (gathered under ZeRO-3, as the next forward reads them) still hold a nonzero value at."""

    def __init__(self, pruning: PathBudgetPruning) -> None:
        self.pruning, self.rounds = pruning, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.pruning.last_step == trainer.global_step and trainer.global_step > 0:
            weights = {name: pl_module.net.get_submodule(name).weight for name in self.pruning.masks}
            with live(list(weights.values())):
                nonzero = sum(int((p.data[~self.pruning.masks[name].to(p.device)] != 0).sum())
                              for name, p in weights.items())
            self.rounds.append(dict(self.pruning.last, step=trainer.global_step, live_nonzero=nonzero))


def live(params):
    """The full live data of ZeRO-3 parameters for the duration (a collective); a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


class PrunedStateProbe(Callback):
    """At the end of training, counts the optimizer-state entries (Adam's moments) at pruned positions that
    are not zero, read through DeepSpeed's own full-state accessor under DeepSpeed (a collective)."""

    def __init__(self, pruning: PathBudgetPruning) -> None:
        self.pruning, self.nonzero = pruning, None

    def on_train_end(self, trainer, pl_module, *args) -> None:
        self.nonzero = 0
        for name, mask in self.pruning.masks.items():
            p = pl_module.net.get_submodule(name).weight
            for key in ("exp_avg", "exp_avg_sq"):
                if type(trainer.model).__name__ == "DeepSpeedEngine":
                    from deepspeed.utils import safe_get_full_optimizer_state

                    value = safe_get_full_optimizer_state(p, key)
                else:
                    value = trainer.optimizers[0].state[p][key]
                self.nonzero += int((value.reshape(mask.shape)[~mask.to(value.device)] != 0).sum())


class StopAt(Callback):
    """Kills the process as the first batch after step `step` starts: the checkpoint written at the end
    of the previous epoch is all a resumed run gets."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            trainer.strategy.barrier()
            os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()
    out = Path(args.out)
    strategy, devices = strategy_for(args.strategy)
    pl.seed_everything(0, workers=True)
    model = (FullyShardedDigitsNet if args.strategy == "fsdp2" else DigitsNet)(width=8)
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and args.resume is None:
        torch.save(model.state_dict(), out / "init.pt")
    monitors = [PathNormMonitor(q=(1, 2), every_n_steps=EVERY),
                PathMetricDrift(reference="init", every_n_steps=EVERY),
                PathMetricDrift(reference="last_checkpoint", prefix="pathmetric_checkpoint"),
                GeneralizationBoundMonitor()]
    extra: list[Callback] = [StopAt(args.stop_at)] if args.stop_at else []
    probe = ShardingProbe()
    pruning = (PathBudgetPruning(budget=0.3, every_n_steps=6, end=12, target_sparsity=0.5, rewind_to=2, module="net")
               if args.strategy != "fsdp2" else None)
    rounds = PruningRounds(pruning) if pruning else None
    state_probe = PrunedStateProbe(pruning) if pruning else None
    extra += [pruning, rounds, state_probe] if pruning else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.max_steps, default_root_dir=str(out),
        logger=TensorBoardLogger(str(out), name="tb", version=0),
        callbacks=[*monitors, probe, ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1), *extra],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
        use_distributed_sampler=False)
    trainer.fit(model, UnshuffledDigits(batch_size=BATCH // devices, limit=600), ckpt_path=args.resume)
    trainer.save_checkpoint(str(out / "ckpt" / "final.ckpt"))  # collective: every rank
    result = {"norm": monitors[0].last, "drift_init": monitors[1].last, "drift_checkpoint": monitors[2].last,
              "bound": monitors[3].last, "n_samples": monitors[3].n_samples, "input_bound": monitors[3].input_bound,
              "sharded": probe.sharded, "gathers": probe.gathers, "global_step": trainer.global_step,
              "pruning_rounds": rounds.rounds if rounds else [],
              "pruned_state_nonzero": state_probe.nonzero if state_probe else None}
    if pruning:
        torch.save({name: mask.cpu() for name, mask in pruning.masks.items()}, out / f"masks{trainer.global_rank}.pt")
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
