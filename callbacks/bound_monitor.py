"""`GeneralizationBoundMonitor`: the path-norm generalization bound beside the measured gap (MATH.md §5)."""
from __future__ import annotations

from typing import Any, Iterable, Literal, Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from pathmonitor.bounds import check_number

from .base import PathCallback, log_values, restore
from .values import log10
from .data_pass import measure_accuracy_gap, training_set_statistics

LAYOUT = {"pathmonitor": {"generalization bound vs measured gap": ["Multiline", ["bound/value", "bound/gap"]]}}


class GeneralizationBoundMonitor(PathCallback):
    """Logs, every `every_n_epochs` epochs at the end of the training epoch (after its validation):
    `bound/value` = L * ||Phi(theta)||_1 * 4CB/sqrt(n), `bound/log10_value`, `bound/first_part` = 4CB/sqrt(n),
    and the measured generalization gap `bound/gap`.

    The gap is read from metrics the LightningModule already logs, `gap_metrics=(train, validation)`:
    validation minus training for `gap_kind="loss"`, training minus validation for "accuracy". When
    those are not logged, the callback measures the accuracy gap itself (argmax of the outputs against
    the targets, with torchmetrics) on at most `gap_batches` batches of each dataloader.
    `n_samples` and `input_bound` (B = max ||x||_inf) default from one pass over one epoch of the training
    dataloader (as `limit_train_batches` limits it) at the start of every fit. A TensorBoard custom-scalars
    chart draws bound and gap together. A `ModelCheckpoint` or `EarlyStopping` that monitors `bound/*`
    needs `save_on_train_epoch_end` / `check_on_train_epoch_end`: the bound comes after validation.
    The float64 values last logged are in `.last`."""

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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, sharpened=self.sharpened)

    def start_fit(self) -> None:
        self.last, self.last_epoch, self._validated_epoch = {}, -1, -1
        self.n_samples, self.input_bound = self.given

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a resumed run has them from its checkpoint: a pass over augmented data would draw another B
        if self.n_samples is None or self.input_bound is None:
            n_samples, input_bound = training_set_statistics(trainer, pl_module)
            self.n_samples = self.n_samples or n_samples
            self.input_bound = input_bound if self.input_bound is None else self.input_bound
        self.tracked.input_bound = self.input_bound
        self._register_layout(trainer.loggers)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

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
        train_name, val_name = self.gap_metrics
        logged = trainer.callback_metrics
        if self._validated_epoch != trainer.current_epoch:
            # a logged validation value would be an earlier epoch's, and a measured gap would mix kinds
            self.gap_source = f"none: no validation ran in epoch {trainer.current_epoch}"
            return None
        # one decision for all ranks: measuring is collective, and a metric may be logged on rank 0 only
        if trainer.strategy.reduce_boolean_decision(train_name in logged and val_name in logged, all=True):
            train, val = float(logged[train_name]), float(logged[val_name])
            self.gap_source = f"logged {train_name!r} and {val_name!r}"
            return val - train if self.gap_kind == "loss" else train - val
        gap = measure_accuracy_gap(trainer, pl_module, self.gap_batches)
        measured = f"accuracy measured on up to {self.gap_batches} batches"
        self.gap_source = measured if gap is not None else "none: could not be measured"
        return gap

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
                "input_bound": self.input_bound, "validated_epoch": self._validated_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore(self, state_dict, ("last", "last_epoch"))
        # what the run measured; values given to the constructor stay
        given_n, given_bound = self.given
        self.n_samples = given_n if given_n is not None else state_dict.get("n_samples", self.n_samples)
        self.input_bound = given_bound if given_bound is not None else state_dict.get("input_bound", self.input_bound)
        self._validated_epoch = state_dict.get("validated_epoch", self._validated_epoch)
