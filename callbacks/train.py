"""Training from the command line: `pathmonitor fit ...` through LightningCLI, and `pathmonitor demo`,
which trains the demo config next to its dense twin (the same run without the regularizer and the
pruning), compares them and draws the run's report."""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import LightningCLI

import pathmonitor.callbacks as package
from pathmonitor.errors import PathComputationError
from pathmonitor.norms import check_support
from pathmonitor.tracking import TrackedModel, tracked

from .base import PathCallback, moment
from .checkpoints import AuditError
from .norm_monitor import PathNormMonitor
from .pruning import PathBudgetPruning
from .regularizer import PathNormRegularizer
from .report import write_report
from .values import example_input_shape, log10

# imported, not only named in configs: LightningCLI resolves a bare class name among the classes loaded
LOADED = tuple(getattr(package, name) for name in package.__all__)

DEMO_CONFIG = Path("configs") / "digits.yaml"


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


def lightning_cli(argv: Sequence[str], callbacks: Sequence[Callback] = ()) -> PathMonitorCLI:
    """LightningCLI on `argv` (a subcommand and its options), any LightningModule and data module, with
    `callbacks` added to those of the configs."""
    args = list(argv)
    with warnings.catch_warnings():
        # arguments that differ from the command line are deliberate (the demo's): Lightning's warning
        # against mixing the two would only be noise
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return PathMonitorCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                              subclass_mode_data=True, args=None if args == sys.argv[1:] else args,
                              trainer_defaults={"callbacks": list(callbacks)}, save_config_kwargs={"overwrite": True})


class FinalPathNorm(Callback):
    """The log10 L1 path-norm of the weights a fit ends with (after the last pruning round), computed on
    every rank while the strategy still holds the model; None when no supported module can be measured."""

    def __init__(self) -> None:
        self.log10_l1: Optional[float] = None

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        watched = measured_model(trainer, pl_module)
        if watched is None:
            return
        try:
            self.log10_l1 = log10(watched.at(moment(trainer)).path_norm(1.0).log_value)
        except PathComputationError:  # weights that became NaN: the comparison shows "-", the run stands
            self.log10_l1 = None


def measured_model(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[TrackedModel]:
    """What the run's path-norm is of: the module a PathNormMonitor (else another pathmonitor callback)
    watches, else the LightningModule itself when it is supported at its example input's shape."""
    ours = [c for c in trainer.callbacks if isinstance(c, PathCallback) and c._tracked is not None]
    ours.sort(key=lambda callback: not isinstance(callback, PathNormMonitor))
    if ours:
        return ours[0].tracked
    try:
        shape = example_input_shape(pl_module)
    except ValueError:
        return None
    if check_support(pl_module, shape):
        return None
    return tracked(pl_module, shape, synchronized=trainer.world_size > 1)


def fit(argv: Sequence[str]) -> "pl.Trainer":
    """`pathmonitor fit ARGV` in this process, measuring the final path-norm; the trainer after the run."""
    return lightning_cli(["fit", *argv], callbacks=[FinalPathNorm()]).trainer


def changes_weights(entry: object) -> bool:
    """Whether a callback entry of a config is a PathNormRegularizer or PathBudgetPruning (or a subclass),
    however its class_path is spelled (full path, or the bare name LightningCLI also accepts)."""
    class_path = entry.get("class_path") if isinstance(entry, dict) else None
    if not isinstance(class_path, str):
        return False
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "pathmonitor.callbacks"), name)
    except (ImportError, AttributeError, ValueError):
        return False  # not ours; LightningCLI will say what is wrong with it
    return isinstance(cls, type) and issubclass(cls, (PathNormRegularizer, PathBudgetPruning))


def dense_twin(config: dict) -> dict:
    """The same config without the callbacks that change the weights, its logger's run named `<name>_dense`."""
    trainer = dict(config.get("trainer") or {})
    if "callbacks" in trainer:
        trainer["callbacks"] = [c for c in trainer["callbacks"] or [] if not changes_weights(c)]
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        init_args = dict(logger.get("init_args") or {})
        init_args["name"] = f"{init_args.get('name') or 'lightning_logs'}_dense"
        trainer["logger"] = {**logger, "init_args": init_args}
    return {**config, "trainer": trainer} if trainer or "trainer" in config else dict(config)


def final_values(trainer: "pl.Trainer") -> dict[str, str]:
    """Validation accuracy, sparsity and log10 L1 path-norm a run ends with, as the comparison shows them."""
    found = {"val_acc": f"{float(trainer.callback_metrics['val_acc']):.2%}"
             if "val_acc" in trainer.callback_metrics else "-", "sparsity": "0.00%", "log10 L1 path-norm": "-"}
    for callback in trainer.callbacks:
        if isinstance(callback, PathBudgetPruning) and "prune/sparsity" in callback.last:
            found["sparsity"] = f"{callback.last['prune/sparsity']:.2%}"
        # not a monitor's last value: that may predate the last pruning round
        if isinstance(callback, FinalPathNorm) and callback.log10_l1 is not None:
            found["log10 L1 path-norm"] = f"{callback.log10_l1:.2f}"
    return found


def comparison(dense: "pl.Trainer", trained: "pl.Trainer") -> str:
    """Validation accuracy, sparsity and final L1 path-norm of the demo run next to its dense twin's."""
    left, right = final_values(dense), final_values(trained)
    lines = [f"{'':<22}{'dense':>12}{'demo run':>12}"]
    lines += [f"{key:<22}{left[key]:>12}{right[key]:>12}" for key in left]
    return "\n".join(lines)


def demo(argv: Sequence[str]) -> tuple["pl.Trainer", "pl.Trainer"]:
    """`pathmonitor demo [-c|--config CONFIG ...] [fit options]`: train the configs (default
    configs/digits.yaml; several stack as with `fit`) and their dense twin, the fit options applying to
    both, then compare them; the two trainers, the dense twin's first."""
    parser = argparse.ArgumentParser(prog="pathmonitor demo", allow_abbrev=False)
    parser.add_argument("-c", "--config", type=Path, action="append")  # LightningCLI's short form too
    known, rest = parser.parse_known_args(argv)
    paths: list[Path] = known.config or [DEMO_CONFIG]
    configs = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"pathmonitor demo: {path} not found (run it from the repository root, or pass --config)")
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict):
            raise SystemExit(f"pathmonitor demo: {path} is not a LightningCLI config (a YAML mapping)")
        configs.append(config)
    with tempfile.TemporaryDirectory() as scratch:
        twins = []
        for position, (path, config) in enumerate(zip(paths, configs)):
            twin = Path(scratch) / f"{position}_{path.stem}_dense.yaml"
            twin.write_text(yaml.safe_dump(dense_twin(config)))
            twins += ["--config", str(twin)]
        dense = fit([*twins, *rest])
    trained = fit([*(arg for path in paths for arg in ("--config", str(path))), *rest])
    if trained.is_global_zero:
        print(f"\n{' + '.join(map(str, paths))} next to its dense twin (the same run without the regularizer and "
              f"the pruning):")
        print(comparison(dense, trained))
        if trained.logger is not None and trained.logger.log_dir:
            figure = Path(trained.logger.log_dir) / "report.png"
            try:
                write_report(Path(trained.logger.log_dir), figure)
                print(f"report of the demo run: {figure}")
            except AuditError as error:  # another logger, or no pathmonitor tags: the runs themselves are fine
                print(f"no report of the demo run: {error}")
    return dense, trained
