"""`PathBudgetPruning`: scheduled in-training pruning whose every round is bounded by a path-metric budget
and ordered by rescaling-invariant path-magnitude scores (MATH.md sections 3 and 4)."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from pathmonitor.bounds import check_number
from pathmonitor.distributed import full_shape, has_class_named, is_sharded
from pathmonitor.masking import MaskKeeper, mask_keeper
from pathmonitor.pruning import Budget, Certified, Ramp, Scope, check_budget, prune_round, ramped_sparsity
from pathmonitor.scores import check_untied, selected_modules

from .base import (MonitorError, PathCallback, between_deepspeed_micro_batches, check_deepspeed_gradients,
                   ends_the_epoch, is_due, log_values, restore)
from .checkpoints import state_key_fields

Selection = Sequence[tuple[nn.Module, str]]


class PathBudgetPruning(PathCallback):
    """Prunes the weights of Linear / Conv / ConvTranspose layers (never biases or batch-norm; or the
    `parameters_to_prune` [(module, "weight"), ...]) in rounds, each removing the entries with the least
    path mass, re-scored as they go, until the round's exact path-metric to its pre-round weights reaches
    the budget, or until the round's scheduled sparsity.

    budget: relative to the pre-round L1 path-norm, in (0, 1]; or `pathmonitor.Certified(change,
    input_bound)`, a bound on how much any output may move (l1) for inputs with ||x||_inf <= input_bound.
    When: with `every_n_steps=n` right after the optimizer step when `trainer.global_step` (1 after the
    first step) is a multiple of n in [start, end]; with `every_n_epochs=n` (or neither given: every
    epoch) at the end of every n-th epoch, counted the same way (1 after the first); or whenever
    `schedule(global_step)` says so. With `target_sparsity`, a round also stops at the sparsity ramped
    (linearly or cubically) from 0 at `start` to `target_sparsity` at `end`. `scope="layer"` gives each
    layer an equal share of the budget (and of the round's cap, by size). `rewind_to=r` resets the
    surviving weights to their values after r optimizer steps (r epochs with `every_n_epochs`; 0: the
    initial weights) at every round (lottery-ticket rewinding), and the optimizer state of the selected
    weights starts afresh, step counts included; the logged change is then the pruning's, before the rewind.
    Masks are enforced on the weights after every optimizer step, on the gradients before it and on the
    optimizer state at every round, so that the checkpoint holds zeros under the model's own keys;
    `make_permanent=False` leaves `torch.nn.utils.prune` masks on the modules at the end of training.
    Another fit of the same model goes on from the masks of the last.

    Logs per round `prune/sparsity`, `prune/removed`, `prune/change_relative`, `prune/budget_spent` and,
    when an input bound is known, `prune/certified_change`; a per-layer sparsity histogram on TensorBoard."""

    def __init__(self, budget: Budget = 0.05, every_n_steps: Optional[int] = None,
                 every_n_epochs: Optional[int] = None, start: int = 0, end: Optional[int] = None,
                 target_sparsity: Optional[float] = None, ramp: Ramp = "cubic", scope: Scope = "global",
                 parameters_to_prune: Optional[Selection] = None, rewind_to: Optional[int] = None,
                 make_permanent: bool = True, input_shape: Optional[Sequence[int]] = None,
                 module: Optional[str] = None, schedule: Optional[Callable[[int], bool]] = None):
        super().__init__(module, input_shape)
        check_budget(budget)
        self.budget = budget
        given = [name for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs),
                                          ("schedule", schedule)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"PathBudgetPruning takes one of every_n_steps, every_n_epochs and schedule; got {given}")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None:
                check_number(name, value, integer=True)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> bool, got {schedule!r}")
        self.every_n_steps, self.schedule = every_n_steps, schedule
        self.every_n_epochs = 1 if not given else every_n_epochs  # neither given: once per epoch
        check_number("start", start, integer=True, strict=False)
        if end is not None:
            check_number("end", end, integer=True, minimum=start, strict=False)
        self.start, self.end = start, end
        if target_sparsity is not None:
            check_number("target_sparsity", target_sparsity, strict=False)
            if target_sparsity >= 1:
                raise ValueError(f"target_sparsity must lie in [0, 1), got {target_sparsity!r}")
            if end is None:
                raise ValueError("target_sparsity is reached at `end`: give end (a step, or an epoch with "
                                 "every_n_epochs)")
        self.target_sparsity = target_sparsity
        if ramp not in ("linear", "cubic"):
            raise ValueError(f"ramp must be 'linear' or 'cubic', got {ramp!r}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.ramp, self.scope = ramp, scope
        if parameters_to_prune is not None:
            parameters_to_prune = list(parameters_to_prune)
            for entry in parameters_to_prune:
                if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], nn.Module)
                        and entry[1] == "weight"):
                    raise ValueError(f"parameters_to_prune takes [(module, 'weight'), ...], got the entry {entry!r}")
        self.parameters_to_prune = parameters_to_prune
        if rewind_to is not None:
            check_number("rewind_to", rewind_to, integer=True, strict=False)
        self.rewind_to = rewind_to
        self.make_permanent = bool(make_permanent)
        self.masks: dict[str, Tensor] = {}
        self.rewind: Optional[dict[str, Tensor]] = None
        self.last: dict[str, float] = {}
        self.last_step = -1
        self.rounds = 0
        self._restored = False  # masks came from a checkpoint in this fit
        self.enforcing = False  # whether any entry is pruned: the masks then hold at every step
        self.keeper: Optional[MaskKeeper] = None

    @property
    def state_key(self) -> str:
        # the module and the window: two callbacks may prune one module in turns (how each prunes may change)
        unit = "epoch" if self.every_n_epochs is not None else "step"
        return self._generate_state_key(module=self.module, window=(unit, self.start, self.end))

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        """A state saved under another key (another window, or the scope earlier versions put in the key) is
        this callback's when it is the only one saved for the module: the masks must not be lost."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        name = type(self).__qualname__
        saved = [key for key in states if str(key).startswith(name + "{")
                 and (state_key_fields(key) or {}).get("module", None) == self.module]
        if len(saved) > 1:
            raise MonitorError(f"PathBudgetPruning(module={self.module!r}): the checkpoint holds {len(saved)} pruning "
                               f"states for this module, none under this callback's settings ({self.state_key}); "
                               f"resume with the settings the checkpoint was saved with: {sorted(map(str, saved))}")
        if saved:
            self.load_state_dict(states[saved[0]])

    # -- set-up ----------------------------------------------------------------------------------------
    def attach(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        earlier = self._tracked
        super().attach(trainer, pl_module)
        watched = self.watched_module(pl_module)
        graph = self.tracked.graph
        try:
            names = selected_modules(graph, watched, self._selected_weight_names(watched))
            if watched is not pl_module:  # a weight tied to one outside the watched module
                check_untied(pl_module, [f"{self.module}.{name}" if name else self.module for name in names])
        except ValueError as error:
            raise MonitorError(f"PathBudgetPruning: {error}") from None
        if not names:
            raise MonitorError(f"PathBudgetPruning: {type(watched).__name__} has no Linear / Conv / ConvTranspose "
                               f"weight on its input-output paths to prune")
        _check_plain_weights(watched, names)
        fresh = {name: torch.ones(full_shape(watched.get_submodule(name).weight), dtype=torch.bool) for name in names}
        fitting = self.masks.keys() == fresh.keys() and all(self.masks[name].shape == mask.shape
                                                             for name, mask in fresh.items())
        if self._restored and not fitting:  # restored before this (a model built in configure_model)
            self._check_saved_masks(self.masks, fresh)
        # another fit of the same model goes on from the masks of the last: what was pruned stays pruned
        if not (fitting and (self._restored or (earlier is not None and earlier.is_of(watched)))):
            self.masks = fresh
        self._masks_changed()

    def _selected_weight_names(self, watched: nn.Module) -> Optional[list[str]]:
        if self.parameters_to_prune is None:
            return None
        names = {id(m): name for name, m in watched.named_modules()}
        missing = [type(m).__name__ for m, _ in self.parameters_to_prune if id(m) not in names]
        if missing:
            raise MonitorError(f"PathBudgetPruning: parameters_to_prune names modules that are not in the watched "
                               f"model: {missing}")
        return [f"{names[id(m)]}.weight" if names[id(m)] else "weight" for m, _ in self.parameters_to_prune]

    def start_fit(self) -> None:
        self.last, self.last_step, self.rounds, self.rewind = {}, -1, 0, None
        self._restored = False

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        deepspeed = has_class_named(trainer.model, "DeepSpeedEngine")
        if is_sharded(pl_module) and not deepspeed:
            raise MonitorError("PathBudgetPruning runs on one process, under DDP and under DeepSpeed ZeRO-1/2/3; "
                               "FSDP2 (DTensor parameters) is not supported")
        if deepspeed:
            check_deepspeed_gradients(trainer.model, "PathBudgetPruning")
            if not self.make_permanent:
                raise MonitorError("PathBudgetPruning(make_permanent=False) leaves torch.nn.utils.prune masks on the "
                                   "modules, which DeepSpeed's partitioned parameters cannot carry; use "
                                   "make_permanent=True (the checkpoint holds the zeros, the masks are in the "
                                   "callback's state)")
        self._check_schedule_fires(trainer)
        self._check_rewind_point()
        try:
            self.keeper = mask_keeper(trainer.model, trainer.optimizers)
        except ValueError as error:
            raise MonitorError(f"PathBudgetPruning: {error}") from None
        device = next(iter(self._weight_parameters().values())).device  # the strategy has placed the model by now
        self.masks = {name: mask.to(device) for name, mask in self.masks.items()}
        if self.rewind_to == 0 and self.rewind is None:
            self.rewind = self._weights()

    def _first_round(self) -> tuple[int, str]:
        """The step (or epoch) of the first round of an every-n schedule, and its unit."""
        every, unit = ((self.every_n_steps, "step") if self.every_n_steps is not None
                       else (self.every_n_epochs, "epoch"))
        return every * max(1, math.ceil(self.start / every)), unit

    def _check_schedule_fires(self, trainer: "pl.Trainer") -> None:
        if self.schedule is not None:
            return
        first, unit = self._first_round()
        every = self.every_n_steps if unit == "step" else self.every_n_epochs
        limits = [x for x in (self.end, *_trainer_limits(trainer, unit))
                  if x is not None and x >= 0 and math.isfinite(x)]  # the trainer's -1 (or inf) means no limit
        last = min(limits) if limits else None
        if last is not None and first > last:
            raise MonitorError(f"PathBudgetPruning would never prune: the first {unit} that is a multiple of {every} "
                               f"and at least start={self.start} is {first}, past the last {unit} {last} (end or the "
                               f"trainer's max_steps / max_epochs)")

    def _check_rewind_point(self) -> None:
        """A round before `rewind_to` would have no weights to rewind to (a resumed run has them already)."""
        if self.rewind_to is None or self.rewind is not None or self.schedule is not None:
            return
        first, unit = self._first_round()
        if self.rewind_to > first:
            raise MonitorError(f"PathBudgetPruning(rewind_to={self.rewind_to}): the first round, at {unit} {first}, "
                               f"comes before the weights to rewind to are taken; give rewind_to <= {first}")

    # -- when ----------------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: Optimizer) -> None:
        if self.enforcing and not between_deepspeed_micro_batches(trainer):
            self.keeper.gradients(self._weight_parameters(), self.masks)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        step = trainer.global_step
        if self.enforcing:
            self._apply_to_weights()
        if self.every_n_epochs is None:
            self._keep_rewind_point(step)
        if self.schedule is not None:
            due = step > 0 and step != self.last_step and bool(self.schedule(step))
        else:
            due = is_due(step, self.every_n_steps, self.last_step) and self._in_window(step)
        if due:
            self._round(trainer, step)
        elif ends_the_epoch(trainer):
            # before the epoch-end validation: a checkpoint saved at its end holds this epoch's round
            self._epoch_end(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_end(trainer)  # an epoch cut short (max_steps) ends here; otherwise done at its last batch

    def _epoch_end(self, trainer: "pl.Trainer") -> None:
        epoch = trainer.current_epoch + 1
        # done at this step already (the epoch's last batch), or a resumed run sees a saved epoch's end again
        if self.every_n_epochs is None or trainer.global_step == self.last_step:
            return
        self._keep_rewind_point(epoch)
        if epoch % self.every_n_epochs == 0 and self._in_window(epoch):
            self._round(trainer, epoch)

    def _keep_rewind_point(self, position: int) -> None:
        """Copy the weights the rounds rewind to, once, at `rewind_to` (steps, or epochs for an epoch schedule)."""
        if self.rewind_to is not None and self.rewind is None and position == self.rewind_to:
            self.rewind = self._weights()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.make_permanent and self.enforcing:
            watched = self.tracked.model
            for name, mask in self.masks.items():
                torch.nn.utils.prune.custom_from_mask(watched.get_submodule(name), "weight", mask)

    def _in_window(self, position: int) -> bool:
        return self.start <= position and (self.end is None or position <= self.end)

    # -- a round -------------------------------------------------------------------------------------------
    def _round(self, trainer: "pl.Trainer", position: int) -> None:
        total = sum(mask.numel() for mask in self.masks.values())
        pruned = total - sum(int(mask.sum()) for mask in self.masks.values())
        cap = None
        if self.target_sparsity is not None:
            scheduled = ramped_sparsity(position, self.start, self.end, self.target_sparsity, self.ramp)
            cap = max(0, math.ceil(scheduled * total - 1e-9) - pruned)
        tracked = self.tracked
        with tracked.source.buffers_held():  # every pass of the round reads the same running statistics
            result = prune_round(tracked.graph, tracked.model, tracked.source, self.masks, self.budget, cap,
                                 self.scope)
        if self.rewind_to is not None and self.rewind is None:  # a schedule ran a round before the point
            rank_zero_warn(f"PathBudgetPruning: round {self.rounds + 1} comes before rewind_to={self.rewind_to}; "
                           f"its survivors are not rewound")
        self.masks, self.rounds, self.last_step = result.masks, self.rounds + 1, trainer.global_step
        self._masks_changed()
        self._apply_to_weights()
        self._apply_to_optimizers(reset=self.rewind is not None)
        if self.rewind is not None:
            self._rewind()
        budget = (self.budget.relative_to(result.log_norm_before) if isinstance(self.budget, Certified)
                  else float(self.budget))
        sparsity = (pruned + result.removed) / total
        values = {"prune/sparsity": sparsity, "prune/removed": float(result.removed),
                  "prune/change_relative": result.change_relative,
                  "prune/budget_spent": result.change_relative / budget}
        input_bound = self.budget.input_bound if isinstance(self.budget, Certified) else tracked.input_bound
        if input_bound is not None:
            values["prune/certified_change"] = max(input_bound, 1.0) * result.change
        self.last = values
        log_values(trainer, values)
        self._log_layer_histogram(trainer)
        rank_zero_info(f"PathBudgetPruning round {self.rounds} at step {trainer.global_step}: removed "
                       f"{result.removed}, sparsity {sparsity:.2%}, path-metric {result.change_relative:.3g} of the "
                       f"L1 path-norm ({values['prune/budget_spent']:.0%} of the budget)")

    def _log_layer_histogram(self, trainer: "pl.Trainer") -> None:
        sparsities = torch.tensor([1 - float(mask.float().mean()) for mask in self.masks.values()])
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_histogram("prune/layer_sparsity", sparsities, trainer.global_step)

    # -- masks on the weights, gradients and optimizer state -----------------------------------------------
    def _masks_changed(self) -> None:
        self.enforcing = any(not bool(mask.all()) for mask in self.masks.values())

    def _weight_parameters(self) -> dict[str, nn.Parameter]:
        watched = self.tracked.model
        return {name: watched.get_submodule(name).weight for name in self.masks}

    def _weights(self) -> dict[str, Tensor]:
        return {name: value.cpu() for name, value in self.keeper.read(self._weight_parameters()).items()}

    def _apply_to_weights(self) -> None:
        self.keeper.weights(self._weight_parameters(), self.masks)

    def _apply_to_optimizers(self, reset: bool) -> None:
        """Zero the optimizer state (Adam's moments, momentum) of pruned entries, or start that of the
        selected weights afresh when they are rewound: state left there would revive a pruned weight."""
        self.keeper.optimizer_state(self._weight_parameters(), self.masks, reset)

    def _rewind(self) -> None:
        self.keeper.write(self._weight_parameters(), self.rewind, self.masks)

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}, "rounds": self.rounds,
                "last": dict(self.last), "last_step": self.last_step,
                "rewind": None if self.rewind is None else {k: v.cpu() for k, v in self.rewind.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore(self, state_dict, ("rounds", "last", "last_step", "rewind"))
        saved = state_dict.get("masks")
        if saved is not None:
            if self._attached:  # else checked when attached (a model built in configure_model)
                self._check_saved_masks(saved, self.masks)
            self.masks = {name: mask.clone() for name, mask in saved.items()}
            self._restored = True
            self._masks_changed()

    @staticmethod
    def _check_saved_masks(saved: dict[str, Tensor], own: dict[str, Tensor]) -> None:
        if saved.keys() != own.keys():
            raise MonitorError(f"PathBudgetPruning: the checkpoint's masks are for {sorted(saved)}, this model "
                               f"prunes {sorted(own)}")
        wrong = [name for name in own if tuple(saved[name].shape) != tuple(own[name].shape)]
        if wrong:
            raise MonitorError(f"PathBudgetPruning: the checkpoint's masks for {wrong} have shapes "
                               f"{[tuple(saved[n].shape) for n in wrong]}, this model's weights "
                               f"{[tuple(own[n].shape) for n in wrong]}")


def _check_plain_weights(watched: nn.Module, names: list[str]) -> None:
    """The masks are kept on each module's own `weight` parameter; a weight computed from others at every
    forward (torch.nn.utils.prune's weight_orig * weight_mask, weight or spectral norm, parametrizations)
    would be recomputed, pruned entries and all, from parameters the masks never reach."""
    derived = [name for name in names if not isinstance(watched.get_submodule(name)._parameters.get("weight"),
                                                         nn.Parameter)]
    if derived:
        raise MonitorError(f"PathBudgetPruning: the weights of {derived} are computed from other parameters at every "
                           f"forward (torch.nn.utils.prune, weight_norm, spectral_norm or a parametrization), where "
                           f"its masks cannot hold; make them plain parameters first (torch.nn.utils.prune.remove, "
                           f"torch.nn.utils.parametrize.remove_parametrizations) or leave them out of "
                           f"parameters_to_prune")


def _trainer_limits(trainer: "pl.Trainer", unit: str) -> list[float]:
    """The last step, or the last epoch (its end counts, also when max_steps cuts it short), the trainer
    will reach; inf or -1 where it does not say."""
    steps = trainer.estimated_stepping_batches
    if unit == "step":
        return [steps]
    trainer.fit_loop.setup_data()  # what fit does right after this hook (and only once): the batches per epoch
    batches = trainer.num_training_batches
    by_steps = -1
    if math.isfinite(steps) and math.isfinite(batches) and batches:
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)  # the last batch of an epoch steps too
        by_steps = math.ceil(steps / per_epoch)
    return [trainer.max_epochs if trainer.max_epochs is not None else -1, by_steps]
