"""One optimizer step whose data loss is zero, with the path-norm regularizer alone, for the gradient tests.

Run as a script (Lightning's DDP and DeepSpeed launchers start the other ranks by running it again):
    python tests/regularizer_step.py STRATEGY OUT_DIR [--accumulate N]
STRATEGY as in training_run.py. Writes OUT_DIR/init.pt (the weights before the step), OUT_DIR/rank{r}.pt
(the full weights every rank holds after it, gathered where they are sharded), OUT_DIR/rank{r}.json (the
logged values) and the final checkpoint OUT_DIR/final.ckpt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from pathmonitor.callbacks import PathNormRegularizer
from pathmonitor.callbacks.digits import DigitsNet
from training_run import BATCH, FullyShardedDigitsNet, UnshuffledDigits, strategy_for

LR, WEIGHT = 0.5, 0.02


class PenaltyOnly:
    """A training step whose data loss is zero (its backward still runs), and plain SGD."""

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return 0.0 * self(x).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def model_for(strategy: str) -> pl.LightningModule:
    base = FullyShardedDigitsNet if strategy == "fsdp2" else DigitsNet
    # width 3: parameters of odd sizes, which ZeRO-3 pads to split them over 2 ranks
    return randomize_batch_norms(type("PenaltyOnlyNet", (PenaltyOnly, base), {})(width=3))


def randomize_batch_norms(model: nn.Module) -> nn.Module:
    """Random running statistics and affine maps, which the training forward leaves alone (momentum 0)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=generator))
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full, as this rank can assemble it (a collective under sharding)."""
    params = dict(model.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {name: p.detach().clone() for name, p in params.items()}
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for name, p in params.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("out")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    strategy, devices = strategy_for(args.strategy)
    pl.seed_everything(0, workers=True)
    model = model_for(args.strategy)
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save({name: p.detach().clone() for name, p in model.named_parameters()}, out / "init.pt")
    regularizer = PathNormRegularizer(WEIGHT)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, accumulate_grad_batches=args.accumulate,
        default_root_dir=str(out), logger=False, enable_checkpointing=False, callbacks=[regularizer],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False)
    trainer.fit(model, UnshuffledDigits(batch_size=BATCH // 2, limit=600))
    rank = trainer.global_rank
    torch.save(full_weights(model), out / f"rank{rank}.pt")
    trainer.save_checkpoint(str(out / "final.ckpt"))  # collective: every rank
    (out / f"rank{rank}.json").write_text(json.dumps({"last": regularizer.last, "global_step": trainer.global_step}))


if __name__ == "__main__":
    sys.exit(main())
