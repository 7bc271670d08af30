"""The `pathmonitor` command: `pathmonitor fit --config configs/digits.yaml` trains with LightningCLI
(configs stack: `--config a.yaml --config b.yaml`); `pathmonitor certify-demo` prints path-norms of
torchvision models and certifies a pruning and quantizations of ResNet-18."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from .base import PathCallback


def run_summary(trainer: "pl.Trainer") -> str:
    """Where the logs are, how to open them, and the values the pathmonitor callbacks logged last."""
    lines = []
    if trainer.logger is not None and trainer.logger.log_dir:
        lines += [f"TensorBoard logs: {trainer.logger.log_dir}",
                  f"open them with:   tensorboard --logdir {trainer.logger.save_dir}  (then http://localhost:6006)"]
    for callback in trainer.callbacks:
        if isinstance(callback, PathCallback) and getattr(callback, "last", None):
            lines.append(f"{type(callback).__name__}:")
            lines += [f"  {tag:<40} {value:.6g}" for tag, value in callback.last.items()]
    for name in ("train_acc", "val_acc"):
        if name in trainer.callback_metrics:
            lines.append(f"{name:<42} {float(trainer.callback_metrics[name]):.4f}")
    return "\n".join(lines)


class PathMonitorCLI(LightningCLI):
    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(run_summary(self.trainer))


def main(args: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["certify-demo"]:
        from pathmonitor.demo import main as certify_demo

        certify_demo()
        return
    PathMonitorCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   args=argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
