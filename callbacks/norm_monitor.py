"""`PathNormMonitor`: the L_q path-norms of the model, live (MATH.md section 2)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import pytorch_lightning as pl

from pathmonitor.bounds import check_number
from pathmonitor.norms import validated_q

from .base import PathCallback, is_due, log_values, restore
from .values import exponent_tag, log10


class PathNormMonitor(PathCallback):
    """Logs `pathnorm/l{q}` = ||Phi(theta)||_q and `pathnorm/log10_l{q}` for each exponent q.

    `log_on="step"`: right after every `every_n_steps`-th optimizer step; `log_on="epoch"`: at the end
    of every training epoch. `l{q}` is inf beyond float64, while `log10_l{q}` stays exact. The float64
    values last logged are in `.last` ({tag: value})."""

    def __init__(self, input_shape: Optional[Sequence[int]] = None, q: Union[float, Sequence[float]] = (1,),
                 every_n_steps: int = 50, log_on: Literal["step", "epoch"] = "step", module: Optional[str] = None):
        super().__init__(module, input_shape)
        exponents = (q,) if isinstance(q, (int, float)) else tuple(q)
        if not exponents:
            raise ValueError("q must name at least one exponent, e.g. q=(1, 2)")
        self.q = tuple(dict.fromkeys(validated_q(e) for e in exponents))
        check_number("every_n_steps", every_n_steps, integer=True)
        self.every_n_steps = every_n_steps
        if log_on not in ("step", "epoch"):
            raise ValueError(f"log_on must be 'step' or 'epoch', got {log_on!r}")
        self.log_on = log_on
        self.last: dict[str, float] = {}
        self.last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(q=self.q, log_on=self.log_on, module=self.module)

    def start_fit(self) -> None:
        self.last, self.last_step = {}, -1

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        if self.log_on == "step" and is_due(trainer.global_step, self.every_n_steps, self.last_step):
            self._log(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a run resumed from a checkpoint saved at an epoch's end may see that end again
        if self.log_on == "epoch" and trainer.global_step != self.last_step:
            self._log(trainer)

    def _log(self, trainer: "pl.Trainer") -> None:
        values = {}
        for q in self.q:
            norm = self.now(trainer).path_norm(q)
            values[f"pathnorm/l{exponent_tag(q)}"] = norm.value
            values[f"pathnorm/log10_l{exponent_tag(q)}"] = log10(norm.log_value)
        self.last, self.last_step = values, trainer.global_step
        log_values(trainer, values)

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore(self, state_dict, ("last", "last_step"))
