"""What every pathmonitor callback shares: which module it watches, at which input shape, the support
check at set-up, the shared `TrackedModel`, the step cadence and the way values reach the loggers.

Values go to every logger with `logger.log_metrics(..., step=trainer.global_step)` rather than through
`LightningModule.log`: the latter writes step-level values only every `log_every_n_steps` and adds
`_step` / `_epoch` suffixes, and it may not be called from `on_save_checkpoint`. They are also put in
`trainer.callback_metrics`, so `ModelCheckpoint` and `EarlyStopping` can monitor them. Every value is
identical on every rank (the computation is collective), so no reduction across ranks is needed.
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import nn

from pathmonitor.distributed import has_class_named
from pathmonitor.errors import UnsupportedModelError
from pathmonitor.graph import ignore_bookkeeping
from pathmonitor.norms import check_support, validated_input_shape
from pathmonitor.tracking import TrackedModel, tracked

from .values import example_input_shape

# Lightning rewrites these on the LightningModule in every hook (the current hook's name, ...): the
# captured graph must not be traced again for them
ignore_bookkeeping(pl.LightningModule, set(vars(pl.LightningModule())) - set(vars(nn.Module())))


class MonitorError(ValueError):
    """A pathmonitor callback is misconfigured for this model; raised at set-up, before any training step."""


def moment(trainer: "pl.Trainer") -> Hashable:
    """The training step and batch; `TrackedModel.at` adds the fit and the weights' version counters."""
    return trainer.global_step, trainer.fit_loop.epoch_loop.total_batch_idx


def log_values(trainer: "pl.Trainer", values: Mapping[str, float]) -> None:
    """Write scalars to every logger at `trainer.global_step` and make them monitorable."""
    if not values:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(values), step=trainer.global_step)  # Lightning's loggers write on rank 0 only
    for tag, value in values.items():
        trainer.callback_metrics[tag] = torch.tensor(value, dtype=torch.float64)


class PathCallback(Callback):
    """Base of the pathmonitor callbacks: resolves the watched module and the input shape, checks support."""

    def __init__(self, module: Optional[str] = None, input_shape: Optional[Sequence[int]] = None):
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be the qualified name of a sub-module (a string), got {module!r}")
        self.module = module
        self.input_shape = None if input_shape is None else validated_input_shape(input_shape)
        self._tracked: Optional[TrackedModel] = None
        self._attached = False

    # -- set-up --------------------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self.start_fit()
        self._attached = False
        # Lightning builds the layers of `configure_model` (or the older `configure_sharded_model`) after
        # every `setup` hook: those models are attached at `on_fit_start`, still before the first step
        if not any(is_overridden(hook, pl_module) for hook in ("configure_model", "configure_sharded_model")):
            self.attach(trainer, pl_module)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._attached:
            self.attach(trainer, pl_module)

    def attach(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Resolve the watched module and the input shape, check support and share the tracked model."""
        self._attached = True
        watched = self.watched_module(pl_module)
        shape = self.resolved_input_shape(pl_module)
        report = check_support(watched, shape)
        if report:
            where = f"sub-module {self.module!r}" if self.module else type(pl_module).__name__
            raise MonitorError(f"{type(self).__name__} cannot watch {where}: {UnsupportedModelError(report)} "
                               f"Every pathmonitor callback takes module='<name>' to watch a supported sub-module.")
        self._tracked = tracked(watched, shape, synchronized=trainer.world_size > 1)
        # a new fit: step numbers start again (every callback's set-up precedes every evaluation)
        self._tracked.fit += 1
        self._tracked.input_bound = None  # until a GeneralizationBoundMonitor of this fit measures it

    def start_fit(self) -> None:
        """Forget the counters of an earlier fit (a resumed one gets them back from its checkpoint,
        which Lightning loads after `setup`)."""

    def watched_module(self, pl_module: "pl.LightningModule") -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise MonitorError(f"{type(self).__name__}(module={self.module!r}): {type(pl_module).__name__} has no "
                               f"sub-module {self.module!r}; its children are {children}") from None

    def resolved_input_shape(self, pl_module: "pl.LightningModule") -> tuple[int, ...]:
        """`input_shape` if given, else the shape of the LightningModule's `example_input_array` without
        its batch dimension."""
        if self.input_shape is not None:
            return self.input_shape
        try:
            return example_input_shape(pl_module)
        except ValueError as problem:
            raise MonitorError(f"{type(self).__name__} needs the shape of one input without the batch dimension: "
                               f"pass input_shape=(C, H, W), or set example_input_array on "
                               f"{type(pl_module).__name__} ({problem})") from None

    @property
    def tracked(self) -> TrackedModel:
        if self._tracked is None:
            raise RuntimeError(f"{type(self).__name__} is used before Trainer.fit set it up")
        return self._tracked

    def now(self, trainer: "pl.Trainer") -> TrackedModel:
        """The shared tracked model, at the current moment of training."""
        return self.tracked.at(moment(trainer))


def between_deepspeed_micro_batches(trainer: "pl.Trainer") -> bool:
    """Whether `on_before_optimizer_step` runs inside DeepSpeed's own gradient accumulation: DeepSpeed
    calls it after every micro-batch, and only the accumulation boundary steps."""
    trained = trainer.model
    return has_class_named(trained, "DeepSpeedEngine") and not trained.is_gradient_accumulation_boundary()


def check_deepspeed_gradients(engine: Any, who: str) -> None:
    """Refuse the DeepSpeed set-ups where the gradients cannot be reached at `on_before_optimizer_step`,
    rather than let a callback that edits them silently do nothing."""
    if not engine.managed_gradient_accumulation():
        raise MonitorError(f"{who} needs DeepSpeed's managed gradient accumulation (the config's "
                           f"managed_gradient_accumulation: true, the default): without it the hook cannot tell the "
                           f"accumulation boundary")
    if has_class_named(engine.optimizer, "BF16_Optimizer"):
        raise MonitorError(f"{who} cannot reach the gradients under DeepSpeed's BF16_Optimizer (bf16 without ZeRO, "
                           f"or with an fp32 grad_accum_dtype): it keeps them where safe_set_full_grad does not write. "
                           f"Use ZeRO stage 1, 2 or 3 with bf16 gradients accumulated in bf16.")


def is_due(step: int, every_n: Optional[int], last_step: int) -> bool:
    """Right after an optimizer step, when `step` (1 after the first step) is a multiple of n and not yet handled."""
    return every_n is not None and step > 0 and step != last_step and step % every_n == 0


def ends_the_epoch(trainer: "pl.Trainer") -> bool:
    """Whether the training batch that just ended is its epoch's last (as Lightning decides it): the
    epoch-end validation, and a checkpoint saved at its end, come after it and before `on_train_epoch_end`."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or progress.current.ready == trainer.num_training_batches


def restore(target: Any, state: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Set the attributes `keys` from `state`; keys missing from older checkpoints keep their values."""
    for key in keys:
        if key in state:
            setattr(target, key, state[key])
