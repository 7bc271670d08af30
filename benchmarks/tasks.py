"""The training tasks the overhead benchmarks time: the digits demo and a torchvision resnet18 at 3x32x32
on random data, each with its batch size, number of epochs and the strategies it runs under; beside the
short runs, resnet18 at CIFAR-10's batch size and epoch length (one process)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pathmonitor.callbacks.digits import DigitsData, DigitsNet


class Resnet18(pl.LightningModule):
    def __init__(self):
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet18(num_classes=10)
        self.example_input_array = torch.zeros(1, 3, 32, 32)

    def forward(self, x):
        return self.net(x)

    def _step(self, batch, stage):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Cycled(Dataset):
    """`length` samples that repeat `base` over and over: an epoch of any length without its memory."""

    def __init__(self, base: Dataset, length: int):
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.base[index % len(self.base)]


class RandomImages(pl.LightningDataModule):
    def __init__(self, batch_size: int, train_images: int = 512):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(576, 3, 32, 32, generator=generator), torch.randint(0, 10, (576,), generator=generator)
        train = TensorDataset(x[:512], y[:512])
        self.train_set = train if train_images == 512 else Cycled(train, train_images)
        self.val_set = TensorDataset(x[512:], y[512:])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


@dataclass(frozen=True)
class Task:
    label: str
    model: Callable[[], pl.LightningModule]
    data: Callable[[int], pl.LightningDataModule]
    batch: int
    epochs: int
    modes: tuple[str, ...] = ("single", "zero3")


TASKS = {"digits": Task("digits", DigitsNet, lambda b: DigitsData(batch_size=b), 64, 5),
         "resnet18": Task("resnet18 (3x32x32, batch 32)", Resnet18, RandomImages, 32, 4),
         # CIFAR-10's training set and usual batch: 391 steps an epoch
         "resnet18-cifar": Task("resnet18 (3x32x32, batch 128, epochs of 50,000 images)", Resnet18,
                                lambda b: RandomImages(b, train_images=50_000), 128, 1, ("single",))}


MODES = {"single": "1 process", "zero3": "ZeRO-3, 2 processes"}  # how each is named in the tables


def strategy_for(mode: str, batch: int):
    """(strategy, devices, per-rank batch) of a mode: one process, or ZeRO-3 on 2 CPU processes with every
    parameter sharded, the global batch split between them."""
    if mode == "single":
        return "auto", 1, batch
    from pathmonitor.strategies import CPUDeepSpeedStrategy

    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": batch // 2}
    return CPUDeepSpeedStrategy(config=config, logging_level=40), 2, batch // 2
