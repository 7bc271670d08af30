"""Passes over the training and validation data: the training-set constants of the bound (n, B) and a
measured accuracy gap. Every rank reads its own shard of the data; the results are reduced across
ranks, so they are identical everywhere. The passes leave the training run as it was: they read the
datasets through fresh, unshuffled loaders (the trainer's own loaders would draw from their random
generators) with the global random state saved and restored."""
from __future__ import annotations

import sys
from typing import Any, Iterable, Mapping, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, SequentialSampler
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from pathmonitor.graph import eval_mode

from .base import MonitorError

_INPUT_KEYS = ("x", "input", "inputs", "image", "images")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")


def inputs_and_targets(batch: Any) -> tuple[Tensor, Optional[Tensor]]:
    """The input tensor of a batch (a tensor, the first entry of a tuple, or a dict entry named like
    an input) and its targets when they can be told apart."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        target = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], target
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _INPUT_KEYS if isinstance(batch.get(k), Tensor)), None)
        if x is not None:
            return x, next((batch[k] for k in _TARGET_KEYS if isinstance(batch.get(k), Tensor)), None)
    raise MonitorError(f"GeneralizationBoundMonitor cannot find the input tensor in a batch of type "
                       f"{type(batch).__name__}: pass n_samples= and input_bound= explicitly")


def _single_loader(loaders: Any) -> Optional[Iterable]:
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    return loaders


def _fresh(loader: Any, trainer: "pl.Trainer") -> Iterable:
    """The same samples in a fixed order, this rank's shard of them, without touching `loader`'s
    sampler or generator; an iterable-style dataset is read through `loader` itself."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    sampler = (DistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                  shuffle=False) if trainer.world_size > 1 else SequentialSampler(loader.dataset))
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, sampler=sampler,
                      collate_fn=loader.collate_fn)


def _reduced(value: float, op: "dist.ReduceOp", device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


def training_set_statistics(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> tuple[int, float]:
    """(n, B): the number of training samples (len of the dataset when it has one, else the samples
    seen) and the largest ||x||_inf over one pass of the training dataloader."""
    loader = _single_loader(trainer.train_dataloader)
    if loader is None:
        raise MonitorError("GeneralizationBoundMonitor found no training dataloader: pass n_samples= and "
                           "input_bound=")
    seen, largest = 0, 0.0
    bar = tqdm(_fresh(loader, trainer), desc="pathmonitor: n and max |x| of the training set", file=sys.stderr,
               leave=False, disable=trainer.global_rank != 0 or not trainer.progress_bar_callback)
    with torch.random.fork_rng(devices=[]):
        for batch in bar:
            x, _ = inputs_and_targets(batch)
            seen += x.shape[0]
            largest = max(largest, float(x.detach().abs().max())) if x.numel() else largest
    device = trainer.strategy.root_device
    dataset = getattr(loader, "dataset", None)
    try:
        n_samples = len(dataset)  # type: ignore[arg-type]
    except TypeError:  # iterable datasets: the samples every rank saw
        n_samples = int(_reduced(float(seen), dist.ReduceOp.SUM, device))
    return n_samples, _reduced(largest, dist.ReduceOp.MAX, device)


def _accuracy(trainer: "pl.Trainer", pl_module: "pl.LightningModule", loader: Iterable,
              max_batches: int) -> Optional[float]:
    """The fraction of correct argmax predictions (micro-averaged) on the first `max_batches` batches."""
    metric = None
    precision = trainer.precision_plugin
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        x, y = inputs_and_targets(batch)
        if y is None:
            return None
        with precision.forward_context():
            out = pl_module(precision.convert_input(x.to(pl_module.device)))
        if not isinstance(out, Tensor) or out.dim() != 2:
            return None
        if metric is None:
            metric = MulticlassAccuracy(num_classes=out.shape[1], average="micro").to(out.device)
        metric.update(out.float(), y.to(out.device))
    return None if metric is None else float(metric.compute())  # compute() syncs across ranks


def measure_accuracy_gap(trainer: "pl.Trainer", pl_module: "pl.LightningModule", max_batches: int) -> Optional[float]:
    """Training minus validation accuracy (argmax of the outputs) on at most `max_batches` batches of
    each dataloader, the model in eval mode; None, with a warning, when it cannot be measured."""
    train = _single_loader(trainer.train_dataloader)
    val = _single_loader(trainer.val_dataloaders)
    accuracies = None
    if train is not None and val is not None:
        with torch.no_grad(), eval_mode(pl_module), torch.random.fork_rng(devices=[]):
            accuracies = tuple(_accuracy(trainer, pl_module, _fresh(loader, trainer), max_batches)
                               for loader in (train, val))
    if accuracies is None or None in accuracies:
        rank_zero_warn("GeneralizationBoundMonitor: no gap logged. Log the metrics named in gap_metrics, or give "
                       "(input, target) batches of a classifier and a validation dataloader so that it can measure "
                       "the accuracy gap itself", category=UserWarning)
        return None
    return accuracies[0] - accuracies[1]
