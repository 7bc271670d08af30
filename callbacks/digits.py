"""The demo task: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes, no download)
and a small ResNet-style CNN with batch-norm, max-pooling and a residual block."""
from __future__ import annotations

from typing import Optional, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsData(pl.LightningDataModule):
    """Digits scaled to [0, 1] (so max ||x||_inf = 1), split 80/20 with a fixed seed."""

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, limit: Optional[int] = None,
                 shuffle: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.batch_size, self.val_fraction, self.seed, self.limit = batch_size, val_fraction, seed, limit
        self.shuffle = shuffle

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        if self.limit is not None:
            order = order[:self.limit]
        n_val = int(len(order) * self.val_fraction)
        self.val_set = TensorDataset(x[order[:n_val]], y[order[:n_val]])
        self.train_set = TensorDataset(x[order[n_val:]], y[order[n_val:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class DigitsNet(pl.LightningModule):
    """conv-bn-relu stem, a residual block, max-pool, conv-bn-relu, max-pool, linear classifier; Adam
    with a cosine learning-rate decay over the run's epochs (constant when the run is bounded by steps).

    Batch-norm momentum 0.5 rather than torch's 0.1: path quantities and evaluation use the running
    statistics, which then follow the weights within a few steps instead of lagging about ten behind
    (a lag that a path-norm penalty, which keeps shrinking the weights before each batch-norm, turns
    into a mismatch between training and evaluation)."""

    def __init__(self, width: int = 16, lr: float = 1e-2, weight_decay: float = 0.0, bn_momentum: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            ResidualBlock(width), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 4, 10))
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Union[torch.optim.Optimizer, dict]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)}
