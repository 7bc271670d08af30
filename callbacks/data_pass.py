"""Passes over the training and validation data: the training-set constants of the bound (n, B) and a
measured accuracy gap. They read the trainer's own dataloaders (their samplers, batch sizes, workers
and augmentations), each rank its own shard, and reduce the results across ranks, so they are
identical everywhere. Batches reach the network as in training: converted to the trainer's precision
and through the batch-transfer hooks when the module or datamodule overrides any. The random states
those loaders draw from (torch's on the CPU and the current GPU, NumPy's, Python's, and every generator
the loaders, samplers and datasets hold) are saved before and restored after, so the run then trains on
the batches it would have seen without the monitor."""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
import sys
import types
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.data import sized_len
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Subset
from torch.utils.data.dataloader import _BaseDataLoaderIter
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


# -- collections of dataloaders ---------------------------------------------------------------------------
# Lightning takes a dataloader or a list, tuple or dict of them (nested too), and gives the training step one
# batch shaped like that collection; the validation loop gives one loader's batch at a time.

def dataloaders(structure: Any) -> list[Any]:
    """The dataloaders of a dataloader or a (nested) list, tuple or dict of them, in order."""
    if isinstance(structure, Mapping):
        return [loader for value in structure.values() for loader in dataloaders(value)]
    if isinstance(structure, (list, tuple)):
        return [loader for value in structure for loader in dataloaders(value)]
    return [] if structure is None else [structure]


def _shaped_like(structure: Any, entries: Iterator[Any]) -> Any:
    """A collection shaped like `structure` holding the next of `entries` where it holds a dataloader."""
    if isinstance(structure, Mapping):
        return {key: _shaped_like(value, entries) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        parts = [_shaped_like(value, entries) for value in structure]
        return parts if isinstance(structure, list) else tuple(parts)
    return next(entries)


def _entries(structure: Any, batch: Any) -> list[Any]:
    """The entries of a batch shaped like `structure`, in the order of `dataloaders(structure)`."""
    if isinstance(structure, Mapping):
        return [entry for key, value in structure.items() for entry in _entries(value, batch[key])]
    if isinstance(structure, (list, tuple)):
        if len(batch) != len(structure):
            raise TypeError(f"{len(batch)} entries where there are {len(structure)} dataloaders")
        return [entry for value, part in zip(structure, batch) for entry in _entries(value, part)]
    return [batch]


# -- random states ----------------------------------------------------------------------------------------
# how to save and restore each kind of random generator a dataset, sampler or transform may keep
_RNG_STATES: tuple[tuple[type, Callable[[Any], Any], Callable[[Any, Any], None]], ...] = (
    (torch.Generator, torch.Generator.get_state, torch.Generator.set_state),
    (np.random.Generator, lambda g: g.bit_generator.state, lambda g, state: setattr(g.bit_generator, "state", state)),
    (np.random.BitGenerator, lambda g: g.state, lambda g, state: setattr(g, "state", state)),
    (np.random.RandomState, np.random.RandomState.get_state, np.random.RandomState.set_state),
    (random.Random, random.Random.getstate, random.Random.setstate),
)
# what holds no generator worth looking for: data, classes and modules (their globals), built-in code, and the
# trainer (from which everything is reachable); a loader's iterator holds worker processes and queues, whose
# generators live in the workers. Functions are looked into: a transform's closure or partial may hold one
_NO_GENERATORS = (Tensor, np.ndarray, str, bytes, bytearray, int, float, complex, type, types.ModuleType,
                  types.BuiltinFunctionType, random.SystemRandom, _BaseDataLoaderIter, pl.Trainer)
_CONTAINERS = (dict, list, tuple, set, frozenset, deque)
_LARGE = 1000  # a longer container holds data (indices, file names, samples), not generators
_MOST_VISITED = 20_000  # objects the search looks at, at most: a dataset referencing more holds them as data


def _rng_kind(obj: Any) -> Optional[tuple[Callable[[Any], Any], Callable[[Any, Any], None]]]:
    """How to get and set the state of `obj` if it is a random generator."""
    return next(((get, put) for kind, get, put in _RNG_STATES if isinstance(obj, kind)), None)


def _references(obj: Any) -> list[Any]:
    """What `obj` refers to: its attributes (in `__dict__` and `__slots__`), a plain container's entries, a
    function's closure, a bound method's object and function, a partial's function and arguments; nothing from
    a container too large to hold a generator."""
    held: list[Any] = []
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict) and len(attributes) <= _LARGE:
        held += attributes.values()
    for cls in type(obj).__mro__:
        slots = vars(cls).get("__slots__", ())
        held += (getattr(obj, name, None) for name in ((slots,) if isinstance(slots, str) else slots))
    if isinstance(obj, _CONTAINERS) and len(obj) <= _LARGE:
        held += obj.values() if isinstance(obj, dict) else obj
    if isinstance(obj, types.FunctionType):
        held += (cell.cell_contents for cell in obj.__closure__ or () if cell.cell_contents is not None)
    if isinstance(obj, types.MethodType):
        held += (obj.__self__, obj.__func__)
    if isinstance(obj, functools.partial):
        held += (obj.func, *obj.args, *obj.keywords.values())
    return held


def _random_generators(roots: Iterable[Any]) -> list[Any]:
    """Every random generator reachable from `roots` (see `_references`), whatever it is named and however deep
    (Lightning wraps a custom sampler in a DistributedSamplerWrapper, which holds it in a dataset of its own; a
    dataset may hold its transforms, which hold theirs). Breadth first, so that the generators a dataset holds
    near its surface are found before its data can use up the search."""
    visited: dict[int, Any] = {}  # keeps what it names alive, so that no id is reused during the search
    found: list[Any] = []
    pending = deque(roots)
    while pending:
        obj = pending.popleft()
        if obj is None or id(obj) in visited or isinstance(obj, _NO_GENERATORS):
            continue
        if len(visited) == _MOST_VISITED:
            rank_zero_warn(f"GeneralizationBoundMonitor: the search of the training dataloaders for random generators "
                           f"(whose states the pass over the data must leave as they were) stopped after "
                           f"{_MOST_VISITED} objects; one further in may be advanced by the pass, and training then "
                           f"see other random draws. Pass n_samples= and input_bound= to skip the pass.")
            break
        visited[id(obj)] = obj
        if _rng_kind(obj) is not None:
            found.append(obj)
        else:
            pending.extend(_references(obj))
    return found


@contextlib.contextmanager
def preserved_random_state(loaders: Iterable[Any]) -> Iterator[None]:
    """Every random state a pass over `loaders` may draw from, restored on exit."""
    saved = []
    for generator in _random_generators(loaders):
        get_state, set_state = _rng_kind(generator)
        saved.append((generator, set_state, get_state(generator)))
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for generator, set_state, state in saved:
            set_state(generator, state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


# -- what one epoch reads ---------------------------------------------------------------------------------
class _Epoch(NamedTuple):
    """The batches one training epoch reads of a loader."""
    batches: Iterable[Any]
    length: Optional[int]  # how many batches, None when the loader is read to its end
    padding: int  # samples a DistributedSampler repeats among them


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


def _index_sampler(loader: Any) -> Any:
    """The sampler that picks the loader's indices: the batch sampler's, and inside Lightning's
    DistributedSamplerWrapper the sampler it wraps."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSamplerWrapper):
        sampler = getattr(sampler.dataset, "_sampler", sampler)  # the wrapper keeps it in a private attribute
    return sampler


def draws_again(loader: Any) -> bool:
    """Whether the sampler of a sized map-style dataset does not visit each index once per epoch (it draws with
    replacement, or another number of samples than the dataset holds): its epochs then read other samples than
    one epoch's draws, which count some twice and miss others. A DistributedSampler shards each epoch instead."""
    dataset = getattr(loader, "dataset", None)
    size = sized_len(dataset) if not isinstance(dataset, IterableDataset) else None
    sampler = _index_sampler(loader)
    if size is None or isinstance(sampler, DistributedSampler):
        return False
    return bool(getattr(sampler, "replacement", False)) or getattr(sampler, "num_samples", size) != size


def _batch_size(loader: DataLoader) -> Optional[int]:
    """The loader's batch size; None when it does not batch, 1 when its batch sampler does not say."""
    if loader.batch_sampler is None:
        return None
    return loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1


def _in_order(loader: DataLoader) -> DataLoader:
    """This rank's share of the loader's whole dataset, read in order in the loader's batches, with its collate_fn
    and as many worker processes as it has (its own, not the loader's); every sample once, whatever it drops."""
    rank, size = world()
    dataset = loader.dataset
    shard = dataset if size == 1 else Subset(dataset, range(rank, len(dataset), size))
    return DataLoader(shard, batch_size=_batch_size(loader), shuffle=False, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context if loader.num_workers else None)


def _padding(loader: Any) -> int:
    """The samples a DistributedSampler repeats so that every rank gets as many."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return sampler.total_size - len(sampler.dataset)
    return 0


@contextlib.contextmanager
def _training_epoch(loader: Any, count: Optional[int]) -> Iterator[_Epoch]:
    """What one training epoch reads of `loader`, which gives it `count` batches (None: to its end): those batches,
    or, when its sampler draws again, the whole dataset in order (that many batches of it when the epoch is cut
    short by `limit_train_batches`)."""
    length = sized_len(loader)
    whole = count is None or (length is not None and count >= length)
    if draws_again(loader):
        reader = _in_order(loader)
        reads = len(reader) if whole else min(count, len(reader))
        yield _Epoch(itertools.islice(reader, reads), reads, 0)
        return
    with batches_of(loader, count) as batches:
        yield _Epoch(batches, count, _padding(loader) if whole and length is not None else 0)


def _batches_per_epoch(loader: Any, most: float) -> Optional[int]:
    """How many batches of `loader` a training epoch takes (None: to its end). Lightning stops after `most`, the
    longest of the loaders as `limit_train_batches` cuts them; a shorter loader gives all its batches (then cycles,
    or is done), and with mode="min_size" `most` is the shortest."""
    length = sized_len(loader)
    count = min(math.inf if length is None else length, most)
    return None if math.isinf(count) else int(count)


# -- batches as the network gets them ---------------------------------------------------------------------
_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def _transfer_hooks(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[list[Callable]]:
    """The batch-transfer hooks as Lightning picks them (the datamodule's where it overrides one, else the module's),
    or None when neither overrides any: then they only move the batch."""
    owners = [trainer.datamodule if is_overridden(name, trainer.datamodule) else pl_module for name in _TRANSFER_HOOKS]
    if not any(is_overridden(name, owner) for name, owner in zip(_TRANSFER_HOOKS, owners)):
        return None
    return [getattr(owner, name) for name, owner in zip(_TRANSFER_HOOKS, owners)]


def _lockstep(epochs: Sequence[Iterable[Any]]) -> Iterator[tuple[list[Any], list[bool]]]:
    """The batches of several loaders side by side, until all are done, with which of them are new: a loader that
    is done gives its first batch again (as Lightning cycles a shorter loader)."""
    iterators = [iter(epoch) for epoch in epochs]
    first: list[Any] = [None] * len(iterators)
    done = [False] * len(iterators)
    while True:
        entries, new = [], []
        for i, iterator in enumerate(iterators):
            batch = None if done[i] else next(iterator, None)
            done[i] = batch is None
            first[i] = batch if first[i] is None else first[i]
            entries.append(first[i] if done[i] else batch)
            new.append(not done[i])
        if not any(new):
            return
        yield entries, new


def network_batches(trainer: "pl.Trainer", pl_module: "pl.LightningModule", structure: Any,
                    epochs: Sequence[Iterable[Any]], dataloader_idx: int) -> Iterator[Any]:
    """The batches of `epochs` (one per dataloader of `structure`) as the network gets them: in the trainer's
    precision and through the batch-transfer hooks when overridden, which take the batches of several training
    loaders together, shaped like `structure`, as Lightning gives them."""
    convert = trainer.precision_plugin.convert_input
    hooks = _transfer_hooks(trainer, pl_module)
    if hooks is None:
        yield from (convert(batch) for epoch in epochs for batch in epoch)
        return
    before, transfer, after = hooks
    for entries, new in _lockstep(epochs):
        batch = convert(_shaped_like(structure, iter(entries)))
        batch = after(transfer(before(batch, dataloader_idx), pl_module.device, dataloader_idx), dataloader_idx)
        try:
            transferred = _entries(structure, batch)
        except (KeyError, IndexError, TypeError) as problem:
            raise MonitorError(f"GeneralizationBoundMonitor: the batch-transfer hooks return a batch not shaped like "
                               f"the training dataloaders ({problem}): pass n_samples= and input_bound=") from None
        yield from (entry for entry, is_new in zip(transferred, new) if is_new)


# -- the training-set constants ---------------------------------------------------------------------------
def check_countable(loaders: Iterable[Any]) -> None:
    """Refuse to count the samples of an IterableDataset that several processes read."""
    for loader in loaders:
        readers = max(1, getattr(loader, "num_workers", 0)) * world()[1]
        if isinstance(getattr(loader, "dataset", None), IterableDataset) and readers > 1:
            raise MonitorError(
                f"GeneralizationBoundMonitor cannot count the samples of an IterableDataset read by {readers} "
                f"processes (worker processes x ranks): each runs its own copy of the dataset's __iter__ and yields "
                f"the whole stream unless the dataset splits it (by get_worker_info() and by rank), which the pass "
                f"cannot tell from its batches. Pass n_samples= (the number of distinct training samples) and "
                f"input_bound= (the largest |x| the network gets).")


def _extent(batches: Iterable[Any]) -> tuple[int, float]:
    """The number of samples in `batches` and their largest |x|."""
    seen, largest = 0, 0.0
    for batch in batches:
        x, _ = inputs_and_targets(batch)
        seen += x.shape[0]
        largest = max(largest, float(x.detach().abs().max())) if x.numel() else largest
    return seen, largest


def _reduced(value: float, op: "dist.ReduceOp", device: torch.device) -> float:
    """`value` reduced with `op` over all ranks."""
    if world()[1] == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


def training_set_statistics(trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                            count_samples: bool = True) -> tuple[int, float]:
    """(n, B): the number of training samples one epoch goes through (over all ranks and training dataloaders,
    `limit_train_batches` heeded; the whole dataset of a loader whose sampler draws again) and the largest
    ||x||_inf over them as the network gets them, from one pass (to its end for a dataloader without a length:
    an endless one needs n_samples= and input_bound=). `count_samples=False`: only B is wanted."""
    structure = trainer.train_dataloader
    loaders = dataloaders(structure)
    if not loaders:
        raise MonitorError("GeneralizationBoundMonitor found no training dataloader: pass n_samples= and "
                           "input_bound=")
    if count_samples:
        check_countable(loaders)
    most = trainer.num_training_batches  # this rank's, after limit_train_batches; inf without a length
    with preserved_random_state(loaders), contextlib.ExitStack() as stack:
        epochs = [stack.enter_context(_training_epoch(loader, _batches_per_epoch(loader, most))) for loader in loaders]
        lengths = [epoch.length for epoch in epochs]
        bar = tqdm(network_batches(trainer, pl_module, structure, [epoch.batches for epoch in epochs], 0),
                   total=None if None in lengths else sum(lengths), file=sys.stderr, leave=False,
                   desc="pathmonitor: n and max |x| of the training set (pass n_samples= and input_bound= to skip)",
                   disable=trainer.global_rank != 0 or not trainer.progress_bar_callback)
        seen, largest = _extent(bar)
    device = trainer.strategy.root_device
    n_samples = int(_reduced(float(seen), dist.ReduceOp.SUM, device)) - sum(epoch.padding for epoch in epochs)
    return n_samples, _reduced(largest, dist.ReduceOp.MAX, device)


# -- the measured accuracy gap ----------------------------------------------------------------------------
def _classifies(out: Any, y: Optional[Tensor]) -> bool:
    """Whether `out` holds scores of 2 or more classes per sample and `y` their integer class indices."""
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] < 2 or y is None:
        return False
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.shape != out.shape[:1]:
        return False
    return y.numel() == 0 or (int(y.min()) >= 0 and int(y.max()) < out.shape[1])


def _accuracy(trainer: "pl.Trainer", pl_module: "pl.LightningModule",
              batches: Iterable[Any]) -> Optional[MulticlassAccuracy]:
    """The micro-averaged accuracy of argmax predictions over `batches`, not yet computed; None when they are
    not a classifier's batches (or none came). Every batch goes through the network all the same: a sharded
    forward is collective."""
    metric: Optional[MulticlassAccuracy] = None
    classifies = True
    for batch in batches:
        x, y = inputs_and_targets(batch)
        with trainer.precision_plugin.forward_context():
            out = pl_module(x.to(pl_module.device))
        classifies = classifies and _classifies(out, y)
        if classifies:
            if metric is None:
                metric = MulticlassAccuracy(num_classes=out.shape[1], average="micro").to(out.device)
            metric.update(out.float(), y.to(out.device))
    return metric if classifies else None


def measure_accuracy_gap(trainer: "pl.Trainer", pl_module: "pl.LightningModule", max_batches: int) -> Optional[float]:
    """Training minus validation accuracy (argmax of the outputs, over all ranks) on at most `max_batches` batches
    of each training and of the first validation dataloader, the model in eval mode; None when it cannot be
    measured: no validation dataloader, or no integer class targets for outputs of 2 or more classes."""
    structure = trainer.train_dataloader
    train, val = dataloaders(structure), dataloaders(trainer.val_dataloaders)[:1]
    if not train or not val:
        return None
    with torch.no_grad(), eval_mode(pl_module), preserved_random_state(train + val), contextlib.ExitStack() as stack:
        metrics = []
        for shape, loaders in ((structure, train), (val[0], val)):
            epochs = [stack.enter_context(batches_of(loader, max_batches)) for loader in loaders]
            metrics.append(_accuracy(trainer, pl_module, network_batches(trainer, pl_module, shape, epochs, 0)))
    # compute() is collective: every rank takes it, or none does
    measured = all(metric is not None for metric in metrics)  # not `in`: a metric's == builds a new metric
    if _reduced(float(measured), dist.ReduceOp.MIN, trainer.strategy.root_device) == 0:
        return None
    train_accuracy, val_accuracy = (float(metric.compute()) for metric in metrics)
    return train_accuracy - val_accuracy
