"""`PathMetricDrift`: how far the network's function can have moved, between checkpoints or since a
reference (MATH.md section 3)."""
from __future__ import annotations

from typing import Any, Hashable, Literal, Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.utilities import rank_zero_warn

from pathmonitor.bounds import check_number
from pathmonitor.distributed import ShardedSnapshot
from pathmonitor.errors import PathComputationError
from pathmonitor.metrics import certified_change
from pathmonitor.tracking import weights_version

from .base import MonitorError, PathCallback, is_due, log_values, restore

Reference = Literal["last_checkpoint", "init", "epoch_start"]


class PathMetricDrift(PathCallback):
    """Logs `pathmetric/drift` = ||Phi(theta_now) - Phi(theta_ref)||_1 (`pm.path_metric(current, reference)`),
    `pathmetric/drift_relative` (over the current L1 path-norm), `pathmetric/exact` (1.0 exact, 0.0 an upper
    bound) and, when an input bound B is given or measured by a `GeneralizationBoundMonitor`,
    `pathmetric/certified_change` = max(B, 1) * drift, a bound on ||R_now(x) - R_ref(x)||_1 for ||x||_inf <= B.

    Tags start with `prefix` ("pathmetric"); two instances in one Trainer need different prefixes.
    It logs on every checkpoint save and, with `every_n_steps`, right after every n-th optimizer step.
    reference: "last_checkpoint" (the weights of the previous save, the weights at the start of
    training before the first one; each save then moves it), "init" (weights and batch-norm statistics
    before the first training step), "epoch_start" (at the start of the current epoch). The reference
    is kept as the parameters are: under ZeRO-3 / FSDP2 each rank holds only its shard. A save that finds
    the weights of the last save at its step logs nothing new; one whose drift cannot be computed (NaN or
    infinite weights) warns, and the checkpoint is written. The float64 values last logged are in `.last`."""

    def __init__(self, reference: Reference = "last_checkpoint", every_n_steps: Optional[int] = None,
                 input_bound: Optional[float] = None, module: Optional[str] = None,
                 input_shape: Optional[Sequence[int]] = None, prefix: str = "pathmetric"):
        super().__init__(module, input_shape)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.prefix = prefix
        if reference not in ("last_checkpoint", "init", "epoch_start"):
            raise ValueError(f"reference must be 'last_checkpoint', 'init' or 'epoch_start', got {reference!r}")
        if input_bound is not None:
            check_number("input_bound", input_bound, strict=False)  # finite: a certified change must be a number
        self.reference = reference
        if every_n_steps is not None:
            check_number("every_n_steps", every_n_steps, integer=True)
        self.every_n_steps = every_n_steps
        self.input_bound = input_bound
        self.last: dict[str, float] = {}
        self.last_step = -1
        self.reference_epoch = -1
        self._reference: Optional[ShardedSnapshot] = None
        self._saved_at: Hashable = None  # (step, weights' version) of the last save handled
        self.saved_step = -1  # the step of the last save handled, kept in the checkpoint
        self._logged_at: Hashable = None

    @property
    def state_key(self) -> str:
        # what identifies the series, not the cadence: a resumed run may log more or less often
        return self._generate_state_key(reference=self.reference, module=self.module, prefix=self.prefix)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._check_companions(trainer)
        super().setup(trainer, pl_module, stage)

    def _check_companions(self, trainer: "pl.Trainer") -> None:
        clashing = [c for c in trainer.callbacks if isinstance(c, PathMetricDrift) and c is not self
                    and c.prefix == self.prefix]
        if clashing:
            raise MonitorError(f"two PathMetricDrift callbacks would log under the same tags {self.prefix}/...: give "
                               f"each its own prefix, e.g. PathMetricDrift(reference={self.reference!r}, "
                               f"prefix='pathmetric_{self.reference}')")
        averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, WeightAveraging)]
        if self.reference == "last_checkpoint" and averaging:
            rank_zero_warn(f"PathMetricDrift(reference='last_checkpoint') with {averaging[0]}: the checkpoints hold "
                           f"the averaged weights, the drift series is that of the weights being trained between the "
                           f"steps of the saves (`pathmonitor drift` on two of the files compares the averages)")
        weights_only = [c for c in trainer.checkpoint_callbacks if getattr(c, "save_weights_only", False)]
        if self.reference == "last_checkpoint" and weights_only:
            raise MonitorError("PathMetricDrift(reference='last_checkpoint') cannot follow ModelCheckpoint("
                               "save_weights_only=True): Lightning calls no callback when it saves weights only, so "
                               "the reference would never move. Save full checkpoints, or use reference='init' or "
                               "'epoch_start'")

    def start_fit(self) -> None:
        self.last, self.last_step, self.reference_epoch, self.saved_step = {}, -1, -1, -1
        self._reference, self._saved_at, self._logged_at = None, None, None

    # -- when ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # "last_checkpoint": the weights training starts from (a resumed run: the checkpoint's own)
        if self._reference is None or self.reference == "last_checkpoint":
            if self._reference is None and trainer.ckpt_path and self.reference != "last_checkpoint":
                rank_zero_warn(f"PathMetricDrift(reference={self.reference!r}): the checkpoint resumed from holds no "
                               f"reference copy for {self.state_key}; drift is measured from the resumed weights")
            self._take_reference(trainer)
        if trainer.ckpt_path and self.saved_step == trainer.global_step:
            # resumed from that save: Lightning may save again at its step (replaying the epoch's end), on
            # the very weights it holds, which are no new checkpoint
            self._saved_at = self._save_moment(trainer)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a run resumed mid-epoch keeps the reference of that epoch's start, restored with the state
        if self.reference == "epoch_start" and self.reference_epoch != trainer.current_epoch:
            self._take_reference(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        if is_due(trainer.global_step, self.every_n_steps, self.last_step):
            self._log(trainer)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        if (self._tracked is None or self._reference is None or trainer.state.fn != "fit"
                or not self._tracked.is_of(self.watched_module(pl_module))):
            return  # not training (a save after another stage, on another model, say)
        at = self._save_moment(trainer)
        if at == self._saved_at:
            return  # these weights were already saved at this step (e.g. a second file)
        self._saved_at, self.saved_step = at, trainer.global_step
        try:
            self._log(trainer)
        except PathComputationError as error:  # the weights decide it, so every rank takes this branch
            rank_zero_warn(f"PathMetricDrift: no drift logged at step {trainer.global_step}, the checkpoint is saved "
                           f"all the same: {error}")
        if self.reference == "last_checkpoint":
            self._take_reference(trainer)
        # Lightning collected the callbacks' states before this hook: store the one that includes this save
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def _save_moment(self, trainer: "pl.Trainer") -> Hashable:
        return trainer.global_step, weights_version(self.tracked.model)

    # -- what ----------------------------------------------------------------------------------------
    def _take_reference(self, trainer: "pl.Trainer") -> None:
        self._reference = self.now(trainer).snapshot()
        self.reference_epoch = trainer.current_epoch

    def _log(self, trainer: "pl.Trainer") -> None:
        at = self._save_moment(trainer)
        if at == self._logged_at:
            return  # the same weights at the same step: logged already (every n steps, then a save)
        self._logged_at = at
        tracked = self.now(trainer)
        metric = tracked.path_metric(self._reference)
        values = {f"{self.prefix}/drift": metric.value, f"{self.prefix}/drift_relative": metric.relative,
                  f"{self.prefix}/exact": 1.0 if metric.exact else 0.0}
        bound = self.input_bound if self.input_bound is not None else tracked.input_bound
        if bound is not None:
            values[f"{self.prefix}/certified_change"] = certified_change(metric, bound)
        self.last, self.last_step = values, trainer.global_step
        log_values(trainer, values)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"last": dict(self.last), "last_step": self.last_step, "reference_epoch": self.reference_epoch,
                 "saved_step": self.saved_step}
        # "last_checkpoint" needs no copy: a run resumed from a checkpoint starts from its very weights
        if self.reference != "last_checkpoint" and self._reference is not None:
            state["reference_copy"] = self._reference.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore(self, state_dict, ("last", "last_step", "reference_epoch", "saved_step"))
        if "reference_copy" in state_dict:
            self._reference = ShardedSnapshot.from_state_dict(state_dict["reference_copy"])
