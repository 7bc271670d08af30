"""GeneralizationBoundMonitor's passes over the data: n and B over the training set the network is trained on
(samplers that draw again, several training loaders, batch-transfer hooks, streams read by several workers),
a gap only from metrics logged in its own epoch, the measured accuracy gap's limits, and every random
generator of the data left as it was."""
from __future__ import annotations

import functools
import random
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, WeightedRandomSampler

from pathmonitor.callbacks import GeneralizationBoundMonitor, MonitorError

FEATURES, CLASSES, PEAK_AT = 4, 3, 7


class Points(Dataset):
    """`size` samples in [-1, 1] with ||x||_inf = 1, except sample 7 whose largest entry is `peak`."""

    def __init__(self, size: int = 40, peak: float = 50.0):
        generator = torch.Generator().manual_seed(size)
        self.x = torch.rand(size, FEATURES, generator=generator) * 2 - 1
        self.x[:, 0] = 1.0
        self.x[PEAK_AT, 0] = peak
        self.y = torch.randint(0, CLASSES, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


class Net(pl.LightningModule):
    """A small ReLU classifier; `training_step` takes one batch or a list or dict of batches."""

    def __init__(self, outputs: int = CLASSES):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, outputs))
        self.example_input_array = torch.zeros(1, FEATURES)
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        several = isinstance(batch, dict) or isinstance(batch[0], (list, tuple))
        parts = (batch.values() if isinstance(batch, dict) else batch) if several else [batch]
        return sum(self.loss(part) for part in parts)

    def validation_step(self, batch, batch_idx):
        return self.loss(batch)

    def both_logged(self) -> bool:
        """Whether it logged both gap metrics in the current epoch."""
        return False

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(model: pl.LightningModule, train, val=None, callbacks=(), **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_steps", 1)
    trainer = pl.Trainer(accelerator="cpu", callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=None if val is not None else 0, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|smaller than the logging interval)")
        trainer.fit(model, train, val)
    return trainer


def measured(train, model=None, **kwargs) -> GeneralizationBoundMonitor:
    monitor = GeneralizationBoundMonitor()
    fit(model or Net(), train, callbacks=[monitor], **kwargs)
    return monitor


# -- n and B --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, limit, n", [
    (lambda data: RandomSampler(data, replacement=True, num_samples=8, generator=torch.Generator().manual_seed(0)),
     None, 40),
    (lambda data: WeightedRandomSampler(torch.ones(len(data)), 4 * len(data)), None, 40),
    (lambda data: RandomSampler(data, num_samples=8), None, 40),
    (lambda data: RandomSampler(data, replacement=True), 2, 16),  # an epoch cut short: that many batches, in order
], ids=["with replacement", "oversampled", "fewer than the dataset", "limited"])
def test_a_sampler_that_draws_again_is_measured_over_the_whole_dataset(sampler, limit, n):
    data = Points()
    monitor = measured(DataLoader(data, batch_size=8, sampler=sampler(data), drop_last=True),
                       limit_train_batches=limit)
    assert (monitor.n_samples, monitor.input_bound) == (n, 50.0)


class Stream(IterableDataset):
    def __iter__(self):
        yield from Points()


def test_an_iterable_dataset_read_by_several_workers_needs_n_and_b():
    model = Net()
    with pytest.raises(MonitorError, match="IterableDataset read by 2 processes.*n_samples=.*input_bound="):
        measured(DataLoader(Stream(), batch_size=8, num_workers=2), model)
    assert model.steps == 0


@pytest.mark.parametrize("collection", [list, dict])
def test_several_training_loaders_make_one_training_set(collection):
    loaders = [DataLoader(Points(40, peak=1.0), batch_size=8), DataLoader(Points(24, peak=9.0), batch_size=8)]
    monitor = measured(loaders if collection is list else dict(zip("ab", loaders)))
    assert (monitor.n_samples, monitor.input_bound) == (64, 9.0)


class Normalized(Net):
    """Normalizes the inputs in `on_after_batch_transfer`, and records the transfer hooks it is called in."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(("before", dataloader_idx))
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.calls.append(("transfer", device.type))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(("after", dataloader_idx))
        x, y = batch
        return (x - 0.5) / 0.25, y


class ScaledSecond(Net):
    """Takes the batches of its two training loaders together, and scales the second one's inputs by 10."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        (x, y) = batch["b"]
        return {"a": batch["a"], "b": (10 * x, y)}


def test_b_is_measured_on_batches_after_the_transfer_hooks():
    model = Normalized()
    monitor = measured(DataLoader(Points(), batch_size=8), model)
    assert monitor.input_bound == pytest.approx((50.0 - 0.5) / 0.25)
    assert model.calls[:3] == [("before", 0), ("transfer", "cpu"), ("after", 0)]
    assert len(model.calls) == 3 * (5 + 1)  # five batches in the pass, one training step

    loaders = {"a": DataLoader(Points(40, peak=1.0), batch_size=8), "b": DataLoader(Points(24, peak=1.0), batch_size=8)}
    monitor = measured(loaders, ScaledSecond())
    assert (monitor.n_samples, monitor.input_bound) == (64, 10.0)


# -- the gap --------------------------------------------------------------------------------------------
class Gaps(pl.Callback):
    """What the monitor logged at every epoch end, beside the gap of the metrics the module logged in it."""

    def __init__(self, monitor: GeneralizationBoundMonitor):
        self.monitor, self.rows = monitor, []

    def on_train_epoch_end(self, trainer, pl_module):
        logged = trainer.callback_metrics
        truth = float(logged["val_loss"]) - float(logged["train_loss"]) if pl_module.both_logged() else None
        self.rows.append((self.monitor.last.get("bound/gap"), truth))


class SometimesLogged(Net):
    """Logs `val_loss` every epoch and `train_loss` (as an epoch mean) in every epoch, or either in even epochs only."""

    def __init__(self, sometimes: str = ""):
        super().__init__()
        self.sometimes = sometimes

    def logs(self, name: str) -> bool:
        return name != self.sometimes or self.current_epoch % 2 == 0

    def both_logged(self) -> bool:
        return self.logs("train_loss") and self.logs("val_loss")

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.logs("train_loss"):
            self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        if self.logs("val_loss"):
            self.log("val_loss", self.loss(batch))


def gaps(model: Net, monitor: GeneralizationBoundMonitor, epochs: int = 3, data: type = Points) -> tuple[list, list]:
    """(bound/gap, the gap of the metrics the module logged) at every epoch end, and the monitor's warnings."""
    recorder = Gaps(monitor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8),
            [monitor, recorder], max_steps=-1, max_epochs=epochs)
    return recorder.rows, [str(w.message) for w in caught if "GeneralizationBoundMonitor" in str(w.message)]


@pytest.mark.parametrize("sometimes", ["train_loss", "val_loss"])
def test_a_gap_is_logged_only_from_metrics_logged_in_its_epoch(sometimes):
    model, monitor = SometimesLogged(sometimes), GeneralizationBoundMonitor(n_samples=40, input_bound=1.0)
    rows, warned = gaps(model, monitor)
    assert rows[1] == (None, None)  # the metric of epoch 0 is not reused
    for gap, truth in (rows[0], rows[2]):
        assert gap == pytest.approx(truth, abs=1e-6)
    assert len(warned) == 1 and repr(sometimes) in warned[0] and "epoch 1" in warned[0]


class LoggedAtEpochEnd(SometimesLogged):
    """Logs `train_loss` in `LightningModule.on_train_epoch_end`, which Lightning calls after the callbacks'."""

    def training_step(self, batch, batch_idx):
        self.epoch_loss = self.loss(batch)
        return self.epoch_loss

    def on_train_epoch_end(self):
        self.log("train_loss", self.epoch_loss)

    def both_logged(self) -> bool:
        return False


def test_a_training_metric_logged_in_the_modules_epoch_end_gives_no_gap_and_one_warning():
    model, monitor = LoggedAtEpochEnd(), GeneralizationBoundMonitor(n_samples=40, input_bound=1.0)
    rows, warned = gaps(model, monitor, epochs=2)
    assert rows == [(None, None)] * 2  # neither last epoch's value nor a measured accuracy gap
    assert len(warned) == 1
    assert "'train_loss'" in warned[0] and "LightningModule.on_train_epoch_end" in warned[0]


@pytest.mark.parametrize("kind", ["loss", "accuracy"])
def test_a_measured_accuracy_gap_asked_as_a_loss_gap_is_announced(kind):
    model, monitor = Net(), GeneralizationBoundMonitor(n_samples=40, input_bound=1.0, gap_kind=kind)
    rows, warned = gaps(model, monitor, epochs=2)
    assert all(gap is not None for gap, _ in rows) and "measured" in monitor.gap_source
    announced = [message for message in warned if "not a loss gap" in message]
    assert len(announced) == (1 if kind == "loss" else 0)


class OneLogit(Net):
    def __init__(self):
        super().__init__(outputs=1)

    def loss(self, batch):
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x)[:, 0], (y > 0).float())


class Unsupervised(Net):
    def loss(self, batch):
        return self(batch[0]).pow(2).mean()


class OutOfRange(Points):
    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        return x, y + CLASSES


@pytest.mark.parametrize("model, data", [(OneLogit, Points), (Unsupervised, OutOfRange)],
                         ids=["one logit", "targets out of range"])
def test_an_accuracy_gap_that_cannot_be_measured_is_not_logged(model, data):
    model, monitor = model(), GeneralizationBoundMonitor(n_samples=40, input_bound=1.0)
    rows, warned = gaps(model, monitor, epochs=1, data=data)
    assert rows == [(None, None)] and monitor.gap_source == "none: could not be measured"
    assert any("no bound/gap" in message for message in warned)


# -- random generators of the data ----------------------------------------------------------------------
class Jitter:
    """An augmentation with its own random generator, of one of the kinds a dataset may keep."""

    def __init__(self, kind: str):
        self.kind = kind
        self.state = {"numpy Generator": lambda: np.random.default_rng(0),
                      "numpy RandomState": lambda: np.random.RandomState(0),
                      "random.Random": lambda: random.Random(0),
                      "torch.Generator": lambda: torch.Generator().manual_seed(0)}[kind]()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "torch.Generator":
            return x + torch.rand((), generator=self.state)
        draw = self.state.random() if self.kind != "numpy RandomState" else self.state.random_sample()
        return x + float(draw)


class Slotted:
    """A transform object with `__slots__` (no `__dict__`)."""

    __slots__ = ("jitter",)

    def __init__(self, jitter: Jitter):
        self.jitter = jitter

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.jitter(x)


def _applied(jitter: Jitter, x: torch.Tensor) -> torch.Tensor:
    return jitter(x)


def _held(jitter: Jitter, holder: str):
    """The augmentation as a dataset may hold it: the object, a closure over it, a partial of it, a slot."""
    if holder == "closure":
        return lambda x: jitter(x)
    if holder == "partial":
        return functools.partial(_applied, jitter)
    return Slotted(jitter) if holder == "slots" else jitter


class Jittered(Points):
    """Points through augmentations kept deep in the dataset, under names other than `generator`, before
    COCO-like metadata (thousands of small dicts and lists) that a depth-first search would go through first."""

    def __init__(self, kind: str, holder: str = "object"):
        super().__init__()
        self.transforms = {"train": [_held(Jitter(kind), holder)]}
        self.meta = [{"anns": [{"bbox": [1, 2, 3, 4], "seg": [[1, 2], [3, 4]]} for _ in range(8)]} for _ in range(500)]

    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        return self.transforms["train"][0](x), y


class FirstBatch(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.x = batch[0].clone()


@pytest.mark.parametrize("kind, holder", [(kind, "object") for kind in ("numpy Generator", "numpy RandomState",
                                                                          "random.Random", "torch.Generator")]
                         + [("numpy Generator", holder) for holder in ("closure", "partial", "slots")])
def test_the_pass_leaves_every_random_generator_of_the_dataset_as_it_was(kind, holder):
    first = []
    for monitors in ([GeneralizationBoundMonitor()], []):
        recorder = FirstBatch()
        fit(Net(), DataLoader(Jittered(kind, holder), batch_size=8), callbacks=[*monitors, recorder])
        first.append(recorder.x)
    assert torch.equal(*first)
