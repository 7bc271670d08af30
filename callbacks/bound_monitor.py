"""`GeneralizationBoundMonitor`: the path-norm generalization bound beside the measured gap (MATH.md §5)."""
from __future__ import annotations

from typing import Any, Iterable, Literal, Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from pathmonitor.bounds import check_number

from .base import PathCallback, log_values, restore
from .data_pass import measure_accuracy_gap, training_set_statistics
from .values import log10


def logged_now(trainer: "pl.Trainer") -> set[str]:
    """The names, as in `trainer.callback_metrics`, of the metrics logged in the current training epoch (while
    training) or validation run (while validating)."""
    # Lightning keeps no public record of when a metric was logged: `callback_metrics` holds a value until it is
    # logged again. The running loop's result collection (private) is reset at the end of every training epoch and
    # of every validation run, and marks each entry logged since with `has_reset = False`.
    results = trainer._results
    names: set[str] = set()
    for metric in results.values() if results is not None else ():
        if not metric.has_reset:
            for on_step in (False, True):
                names.update(results._forked_name(metric, on_step))
    return names


def fresh_value(trainer: "pl.Trainer", name: str) -> Optional[float]:
    """The metric `name` if the current training epoch or validation run logged it, else None."""
    logged = trainer.callback_metrics
    return float(logged[name]) if name in logged and name in logged_now(trainer) else None


LAYOUT = {"pathmonitor": {"generalization bound vs measured gap": ["Multiline", ["bound/value", "bound/gap"]]}}


class GeneralizationBoundMonitor(PathCallback):
    """Logs, every `every_n_epochs` epochs at the end of the training epoch (after its validation):
    `bound/value` = L * ||Phi(theta)||_1 * 4CB/sqrt(n), `bound/log10_value`, `bound/first_part` = 4CB/sqrt(n),
    and the measured generalization gap `bound/gap`.

    The gap is read from metrics the LightningModule logs in that epoch, `gap_metrics=(train, validation)`:
    validation minus training for `gap_kind="loss"`, training minus validation for "accuracy". A value logged
    in an earlier epoch is never used: an epoch whose validation did not log the validation metric, or whose
    training did not log the training metric before the callbacks' `on_train_epoch_end` (Lightning calls
    `LightningModule.on_train_epoch_end` after them), gets no gap, with a warning naming the metric. When the
    run logs neither metric, the callback measures the accuracy gap itself (torchmetrics' MulticlassAccuracy of
    the outputs' argmax against the targets) on at most `gap_batches` batches of each dataloader, and warns
    once if a loss gap was asked for.
    `n_samples` and `input_bound` (B = max ||x||_inf) default from one pass over one epoch of the training
    dataloaders (as `limit_train_batches` limits it; the whole dataset of a loader whose sampler does not visit
    each index once per epoch) at the start of every fit. A TensorBoard custom-scalars chart draws bound and
    gap together. A `ModelCheckpoint` or `EarlyStopping` that monitors `bound/*` needs `save_on_train_epoch_end`
    / `check_on_train_epoch_end`: the bound comes after validation. The float64 values last logged are in
    `.last`."""

    def __init__(self, n_samples: Optional[int] = None, input_bound: Optional[float] = None,
                 every_n_epochs: int = 1, loss_lipschitz: float = 1.0, sharpened: bool = False,
                 gap_metrics: Sequence[str] = ("train_loss", "val_loss"),
                 gap_kind: Literal["loss", "accuracy"] = "loss", gap_batches: int = 20,
                 module: Optional[str] = None, input_shape: Optional[Sequence[int]] = None):
        super().__init__(module, input_shape)
        if n_samples is not None:
            check_number("n_samples", n_samples, integer=True)
        if input_bound is not None:
            check_number("input_bound", input_bound, strict=False)
        self.given = (n_samples, None if input_bound is None else float(input_bound))
        self.n_samples, self.input_bound = self.given  # what is not given is measured once per fit
        check_number("every_n_epochs", every_n_epochs, integer=True)
        self.every_n_epochs = every_n_epochs
        check_number("loss_lipschitz", loss_lipschitz)
        self.loss_lipschitz, self.sharpened = float(loss_lipschitz), bool(sharpened)
        if isinstance(gap_metrics, str) or len(gap_metrics) != 2 or not all(isinstance(n, str) for n in gap_metrics):
            raise ValueError(f"gap_metrics must be two metric names (training, validation), got {gap_metrics!r}")
        if gap_kind not in ("loss", "accuracy"):
            raise ValueError(f"gap_kind must be 'loss' or 'accuracy', got {gap_kind!r}")
        self.gap_metrics, self.gap_kind = tuple(gap_metrics), gap_kind
        check_number("gap_batches", gap_batches, integer=True)
        self.gap_batches = gap_batches
        self.last: dict[str, float] = {}
        self.last_epoch = -1
        self.gap_source = ""
        self._validated_epoch = -1
        self._validation_value: Optional[float] = None  # the validation metric as that epoch's validation logged it
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, sharpened=self.sharpened)

    def start_fit(self) -> None:
        self.last, self.last_epoch, self._validated_epoch, self._validation_value = {}, -1, -1, None
        self.n_samples, self.input_bound = self.given
        self._warned = set()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a resumed run has them from its checkpoint: a pass over augmented data would draw another B
        if self.n_samples is None or self.input_bound is None:
            n_samples, input_bound = training_set_statistics(trainer, pl_module, count_samples=self.n_samples is None)
            self.n_samples = self.n_samples or n_samples
            self.input_bound = input_bound if self.input_bound is None else self.input_bound
        self.tracked.input_bound = self.input_bound
        self._register_layout(trainer.loggers)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # the last hook before Lightning forgets what this validation run logged
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._validated_epoch = trainer.current_epoch
        self._validation_value = fresh_value(trainer, self.gap_metrics[1])

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = trainer.current_epoch + 1  # epochs finished
        if epoch % self.every_n_epochs or epoch == self.last_epoch:
            return
        bound = self.now(trainer).generalization_bound(self.n_samples, self.input_bound, self.loss_lipschitz,
                                                       self.sharpened)
        values = {"bound/value": bound.value, "bound/log10_value": log10(bound.log_value),
                  "bound/first_part": bound.first_part}
        gap = self._gap(trainer, pl_module)
        if gap is not None:
            values["bound/gap"] = gap
        self.last, self.last_epoch = values, epoch
        log_values(trainer, values)

    def _gap(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[float]:
        """This epoch's measured generalization gap; None when there is none to log (`.gap_source` says why)."""
        epoch = trainer.current_epoch
        if self._validated_epoch != epoch:
            # a logged validation value would be an earlier epoch's, and a measured gap would mix kinds
            self.gap_source = f"none: no validation ran in epoch {epoch}"
            return None
        train_name, val_name = self.gap_metrics
        train, val = fresh_value(trainer, train_name), self._validation_value
        # one decision for all ranks: measuring is collective, and a metric may be logged on rank 0 only
        if trainer.strategy.reduce_boolean_decision(train is not None and val is not None, all=True):
            self.gap_source = f"logged {train_name!r} and {val_name!r}"
            return val - train if self.gap_kind == "loss" else train - val
        if trainer.strategy.reduce_boolean_decision(any(n in trainer.callback_metrics for n in self.gap_metrics),
                                                    all=False):
            # the run logs them, not in time for this epoch: a measured accuracy gap would mix kinds in one series
            self._missing_metric(epoch, train_name if train is None else val_name, train is None)
            return None
        return self._measured_gap(trainer, pl_module)

    def _missing_metric(self, epoch: int, name: str, training: bool) -> None:
        """Say once per metric why an epoch gets no gap although the run logs the metrics named."""
        self.gap_source = f"none: {name!r} was not logged in epoch {epoch}"
        why = (f"{name!r} was not logged in that training epoch before the callbacks' on_train_epoch_end" if training
               else f"{name!r} was not logged by that epoch's validation")
        advice = (" Lightning calls LightningModule.on_train_epoch_end after the callbacks' on_train_epoch_end, so "
                  "a metric logged there comes too late: log it from training_step with on_epoch=True."
                  if training else "")
        self._warn_once(name, f"GeneralizationBoundMonitor logs no bound/gap for epoch {epoch} (warned once): {why}, "
                              f"and a value from an earlier epoch is never used.{advice}")

    def _measured_gap(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[float]:
        """The accuracy gap measured by the callback, when the run logs neither metric named."""
        gap = measure_accuracy_gap(trainer, pl_module, self.gap_batches)
        if gap is None:
            self.gap_source = "none: could not be measured"
            self._warn_once("unmeasured", "GeneralizationBoundMonitor: no bound/gap. Log the metrics named in "
                                          "gap_metrics, or give a validation dataloader and (input, target) batches "
                                          "of a classifier (outputs of 2 or more classes, integer class targets) so "
                                          "that it can measure the accuracy gap itself")
            return None
        self.gap_source = f"accuracy measured on up to {self.gap_batches} batches"
        if self.gap_kind == "loss":
            self._warn_once("measured", f"GeneralizationBoundMonitor: bound/gap is the accuracy gap it measures "
                                        f"itself (training minus validation accuracy), not a loss gap: the run logs "
                                        f"neither {self.gap_metrics[0]!r} nor {self.gap_metrics[1]!r}")
        return gap

    def _warn_once(self, key: str, message: str) -> None:
        """Warn with `message` unless this fit already warned under `key`."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    def _register_layout(self, loggers: Iterable[Any]) -> None:
        others = []
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(LAYOUT)  # a no-op object on ranks other than 0
            else:
                others.append(type(logger).__name__)
        if others:
            rank_zero_warn(f"GeneralizationBoundMonitor: {', '.join(others)} gets the bound/* scalars but no chart "
                           f"of bound against gap (a TensorBoard custom-scalars layout)")

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "last_epoch": self.last_epoch, "n_samples": self.n_samples,
                "input_bound": self.input_bound, "validated_epoch": self._validated_epoch,
                "validation_value": self._validation_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore(self, state_dict, ("last", "last_epoch"))
        # what the run measured; values given to the constructor stay
        given_n, given_bound = self.given
        self.n_samples = given_n if given_n is not None else state_dict.get("n_samples", self.n_samples)
        self.input_bound = given_bound if given_bound is not None else state_dict.get("input_bound", self.input_bound)
        self._validated_epoch = state_dict.get("validated_epoch", self._validated_epoch)
        self._validation_value = state_dict.get("validation_value", self._validation_value)
