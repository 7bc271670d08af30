"""Passes over the training and validation data: the training-set constants of the bound (n, B) and a
measured accuracy gap. They read the trainer's own dataloaders (their samplers, batch sizes, workers
and augmentations), each rank its own shard, and reduce the results across ranks, so they are
identical everywhere. The random states those loaders draw from (torch's on the CPU and the current
GPU, NumPy's, Python's, and the loaders' and samplers' own generators) are saved before and restored
after, so the run then trains on the batches it would have seen without the monitor."""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.data import sized_len
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from pathmonitor.distributed import world
from pathmonitor.tracer import eval_mode

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


# where a loader keeps what it draws from: its samplers, and the samplers and datasets they wrap (Lightning
# wraps a custom sampler in a DistributedSamplerWrapper, which holds it in a dataset of its own)
_HOLDERS = ("sampler", "batch_sampler", "dataset", "_sampler")


def _generators(loader: Any) -> list[torch.Generator]:
    found: dict[int, torch.Generator] = {}
    seen: set[int] = set()

    def visit(holder: Any, depth: int) -> None:
        if holder is None or id(holder) in seen or depth > 4:
            return
        seen.add(id(holder))
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator):
            found[id(generator)] = generator
        for name in _HOLDERS:
            visit(getattr(holder, name, None), depth + 1)

    visit(loader, 0)
    return list(found.values())


@contextlib.contextmanager
def preserved_random_state(loaders: Iterable[Any]) -> Iterator[None]:
    """Every random state a pass over `loaders` may draw from, restored on exit."""
    generators = [g for loader in loaders for g in _generators(loader)]
    saved = [g.get_state() for g in generators]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for generator, state in zip(generators, saved):
            generator.set_state(state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def batches_of(loader: Any, count: Optional[int]) -> Iterator[Iterator[Any]]:
    """The loader's first `count` batches (all with None), leaving alone the worker processes a run keeps
    (`persistent_workers`): a pass through them would move their random states on and reseed their next
    epoch. The pass gets workers of its own, stopped after it."""
    if not (getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0):
        yield itertools.islice(loader, count)
        return
    own = loader._get_iterator()
    try:
        yield itertools.islice(own, count)
    finally:
        own._shutdown_workers()


def _reduced(value: float, op: "dist.ReduceOp", device: torch.device) -> float:
    if world()[1] == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


def training_set_statistics(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> tuple[int, float]:
    """(n, B): the number of training samples one epoch goes through (over all ranks, `limit_train_batches`
    heeded) and the largest ||x||_inf over them, from one pass of the training dataloader (to its end when
    it has no length: an endless one needs n_samples= and input_bound=)."""
    loader = _single_loader(trainer.train_dataloader)
    if loader is None:
        raise MonitorError("GeneralizationBoundMonitor found no training dataloader: pass n_samples= and "
                           "input_bound=")
    batches = trainer.num_training_batches  # this rank's, after limit_train_batches; inf without a length
    count = None if math.isinf(batches) else int(batches)
    seen, largest = 0, 0.0
    with preserved_random_state([loader]), batches_of(loader, count) as epoch:
        bar = tqdm(epoch, total=count, file=sys.stderr, leave=False,
                   desc="pathmonitor: n and max |x| of the training set (pass n_samples= and input_bound= to skip)",
                   disable=trainer.global_rank != 0 or not trainer.progress_bar_callback)
        for batch in bar:
            x, _ = inputs_and_targets(batch)
            seen += x.shape[0]
            largest = max(largest, float(x.detach().abs().max())) if x.numel() else largest
    device = trainer.strategy.root_device
    length = sized_len(loader)
    padding = _padding(loader) if length is not None and batches >= length else 0  # the epoch's end is padded
    n_samples = int(_reduced(float(seen), dist.ReduceOp.SUM, device)) - padding
    return n_samples, _reduced(largest, dist.ReduceOp.MAX, device)


def _padding(loader: Any) -> int:
    """The samples a DistributedSampler repeats so that every rank gets as many."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return sampler.total_size - len(sampler.dataset)
    return 0


def _accuracy(trainer: "pl.Trainer", pl_module: "pl.LightningModule", loader: Iterable,
              max_batches: int) -> Optional[float]:
    """The fraction of correct argmax predictions (micro-averaged) on the first `max_batches` batches."""
    metric = None
    precision = trainer.precision_plugin
    with batches_of(loader, max_batches) as batches:
        for batch in batches:
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
        with torch.no_grad(), eval_mode(pl_module), preserved_random_state([train, val]):
            accuracies = tuple(_accuracy(trainer, pl_module, loader, max_batches) for loader in (train, val))
    if accuracies is None or None in accuracies:
        rank_zero_warn("GeneralizationBoundMonitor: no gap logged. Log the metrics named in gap_metrics, or give "
                       "(input, target) batches of a classifier and a validation dataloader so that it can measure "
                       "the accuracy gap itself", category=UserWarning)
        return None
    return accuracies[0] - accuracies[1]
