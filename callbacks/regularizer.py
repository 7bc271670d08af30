"""`PathNormRegularizer`: the path-norm as a rescaling-invariant penalty in the training objective
(MATH.md section 6).

The penalty's gradient is added to the gradients right before each optimizer step
(`on_before_optimizer_step`), rather than its value to the loss. That one mechanism serves every
strategy: under ZeRO-3 the parameters are empty partitions that no autograd graph outside the model's
forward can reach, while the exact gradient, computed module by module inside each gather, can be
added to each rank's gradient partition; under DDP every rank adds the same gradient after the
all-reduce, so nothing is counted twice; and the hook runs once per optimizer step, so gradient
accumulation adds the penalty once, not once per micro-batch. The user's `training_step` is untouched.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch.optim import Optimizer

from pathmonitor.bounds import check_number
from pathmonitor.distributed import has_class_named
from pathmonitor.gradients import gradient_adder
from pathmonitor.norms import validated_q
from pathmonitor.penalty import penalty_gradients, training_dtype

from .base import MonitorError, PathCallback, between_deepspeed_micro_batches, check_deepspeed_gradients, log_values


class PathNormRegularizer(PathCallback):
    """Adds `weight * log ||Phi(theta)||_q` (`log=False`: `weight * ||Phi(theta)||_q`) to the training
    objective of the LightningModule (or of its sub-module `module`), and logs `regularizer/penalty` (that
    log or norm, before the step) and `regularizer/weight` at `trainer.global_step`.

    The weight at optimizer step s (0 for the first step) is `schedule(s)` when a schedule is given, else
    `weight`, times min(1, s / warmup_steps) during a warm-up. With `every_n_steps=n` the penalty is
    applied on steps 0, n, 2n, ... with n times the weight: fewer evaluations, and for an optimizer whose
    step is linear in the gradient (SGD) the same average pull (an adaptive one, such as Adam, normalizes
    the larger, rarer gradient differently). Works on one process, under DDP, DeepSpeed ZeRO-1/2/3 and
    FSDP2. A step whose every `training_step` returned None (a skipped batch) gets no penalty either. With
    manual optimization the penalty joins every `optimizer.step()` the `training_step` makes on the
    optimizer `self.optimizers()` hands out (at most one optimizer), whatever the user accumulated before
    it. The penalty and its gradient are computed in the precision the gradients have (float64 for a
    float64 model, float32 otherwise), exact to its round-off at any magnitude of the path-norm (MATH.md
    section 6); the values last logged are in `.last`."""

    def __init__(self, weight: float, q: float = 1.0, log: bool = True, every_n_steps: int = 1,
                 warmup_steps: int = 0, schedule: Optional[Callable[[int], float]] = None,
                 module: Optional[str] = None, input_shape: Optional[Sequence[int]] = None):
        super().__init__(module, input_shape)
        check_number("weight", weight, strict=False)
        self.weight = float(weight)
        self.q = validated_q(q)
        if not isinstance(log, bool):
            raise TypeError(f"log must be True (penalize log ||Phi||_q) or False (||Phi||_q), got {log!r}")
        self.use_log = log  # not `self.log`: Lightning overwrites every callback's `log` with the module's method
        check_number("every_n_steps", every_n_steps, integer=True)
        self.every_n_steps = every_n_steps
        check_number("warmup_steps", warmup_steps, integer=True, strict=False)
        self.warmup_steps = warmup_steps
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> weight, got {schedule!r}")
        self.schedule = schedule
        self.last: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(q=self.q, log=self.use_log, module=self.module)

    def start_fit(self) -> None:
        self.last = {}

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        self.weight_at(trainer.global_step)  # a schedule that returns nonsense fails before the first step
        if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
            raise MonitorError(f"PathNormRegularizer with manual optimization needs a single optimizer; "
                               f"{type(pl_module).__name__} has {len(trainer.optimizers)}. Add "
                               f"pathmonitor.path_norm_penalty to the loss in training_step instead.")
        if has_class_named(trainer.model, "DeepSpeedEngine"):
            check_deepspeed_gradients(trainer.model, "PathNormRegularizer")
            if trainer.accumulate_grad_batches > 1:
                k = trainer.accumulate_grad_batches
                rank_zero_warn(f"PathNormRegularizer under DeepSpeed with accumulate_grad_batches={k}: Lightning "
                               f"and DeepSpeed each divide the training loss by {k}, so its gradient is 1/{k} of what "
                               f"it is on one process or under DDP, while the penalty keeps its weight; pass "
                               f"weight / {k} to weigh the two as DDP does")

    def weight_at(self, step: int) -> float:
        """The weight of the penalty at optimizer step `step`."""
        weight = self.weight
        if self.schedule is not None:
            weight = self.schedule(step)
            try:
                check_number(f"schedule({step})", weight, strict=False)
            except ValueError as error:
                raise MonitorError(f"PathNormRegularizer: {error}") from None
        if self.warmup_steps:
            weight *= min(1.0, step / self.warmup_steps)
        return float(weight)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: Optimizer) -> None:
        if between_deepspeed_micro_batches(trainer) or _backward_skipped(trainer, pl_module):
            return
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        weight = self.weight_at(step)
        values = {"regularizer/weight": weight}
        if weight > 0:
            tracked = self.tracked
            factor = weight * self.every_n_steps * _still_scaled_by(trainer, optimizer)
            values["regularizer/penalty"] = penalty_gradients(
                tracked.graph, tracked.model, tracked.source, self.q, self.use_log,
                gradient_adder(trainer.model, factor), training_dtype(tracked.model))
        self.last = values
        log_values(trainer, values)

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", self.last))


def _backward_skipped(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> bool:
    """Whether `training_step` returned None (a skipped batch) for every micro-batch of this step: Lightning
    then runs the optimizer step on gradients no backward produced, so a penalty would step alone.
    DeepSpeed keeps its gradients elsewhere, and refuses skipped batches itself."""
    if not pl_module.automatic_optimization or has_class_named(trainer.model, "DeepSpeedEngine"):
        return False
    return all(p.grad is None for p in pl_module.parameters() if p.requires_grad)


def _still_scaled_by(trainer: "pl.Trainer", optimizer: Optimizer) -> float:
    """The factor the gradients still carry at this hook: Lightning unscales an AMP GradScaler's gradients
    before it, except for optimizers that unscale inside their own step (fused ones)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        return float(scaler.get_scale())
    return 1.0

