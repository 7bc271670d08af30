"""Path quantities of a model while it trains, shared by every monitor that asks (DESIGN.md layer 3).

A `TrackedModel` holds the model, its input shape and the parameter source that reads it (gathering
under sharding, rank 0's running statistics under DDP and DeepSpeed). Values are cached per moment:
a token from the caller (the fit and the training step) together with the version counters of every
parameter, shard and buffer, which in-place changes through autograd-visible tensors bump (an optimizer
step on plain parameters, a batch-norm update, pruning, `load_state_dict`), and their identities (a
tensor replaced by another). So several monitors asking
for the L1 path-norm at one step cost one evaluation, and such a change between them is not missed.
Writes through `.data` and DeepSpeed's own updates of its partitions bump no counter: between two
monitors at one step, those go unseen. `tracked(model, shape)` returns the one instance per (model,
input shape), so monitors also share the captured graph.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence, TypeVar

from torch import nn

from .bounds import GeneralizationBound, architecture_constants, assemble_bound
from .distributed import ShardedSnapshot, is_dtensor, is_sharded
from .graph import PathGraph, capture
from .metrics import PathMetric, metric_and_norm
from .norms import norm_and_log, unwrapped, validated_input_shape, validated_q
from .sources import ModuleSource, ParameterSource, submodule

T = TypeVar("T")


@dataclass(frozen=True)
class NormValue:
    """||Phi(theta)||_q (inf beyond float64) and its exact natural logarithm."""

    value: float
    log_value: float


class TrackedModel:
    """One model's path quantities during training, each evaluated at most once per moment."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *, synchronized: bool):
        self.input_shape = validated_input_shape(input_shape)
        # the model held weakly: `tracked` keeps one per live model, and must not keep it alive
        self.source = ModuleSource(unwrapped(model), buffers_from_rank_zero=synchronized, keeps_alive=False)
        self._moment: Hashable = None
        self._values: dict[Hashable, object] = {}
        self._constants: tuple[PathGraph, dict[str, int]] | None = None
        self.input_bound: float | None = None  # max ||x||_inf over the training inputs, once measured
        self.fit = 0  # counts the fits that use this model: step numbers start again in each

    @property
    def model(self) -> nn.Module:
        return self.source.root

    def is_of(self, model: nn.Module) -> bool:
        """Whether this tracks `model` (False once the tracked model is gone)."""
        return self.source.reads(unwrapped(model))

    @property
    def graph(self) -> PathGraph:
        return capture(self.model, self.input_shape)

    def at(self, moment: Hashable) -> "TrackedModel":
        """Values computed at another moment, or on other weights, are forgotten."""
        moment = (moment, self.fit, weights_version(self.model))
        if moment != self._moment:
            self._moment, self._values = moment, {}
        return self

    def _cached(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]  # type: ignore[return-value]

    def path_norm(self, q: float = 1.0) -> NormValue:
        """||Phi(theta)||_q of the current weights (MATH.md section 2)."""
        q = validated_q(q)

        def compute() -> NormValue:
            with self.source.buffers_held():  # rank 0's running statistics in one broadcast
                return NormValue(*norm_and_log(self.graph, self.model, self.source, q))

        return self._cached(("norm", q), compute)

    def path_metric(self, reference: ParameterSource) -> PathMetric:
        """||Phi(theta) - Phi(theta_reference)||_1, current weights first (MATH.md section 3)."""
        # keyed on the object itself, which keeps it alive: a new reference never reuses a stale entry
        def compute() -> PathMetric:
            # the metric's first pass is the L1 path-norm's: done at most once per moment
            known = self._values.get(("norm", 1.0))
            with self.source.buffers_held():  # several passes over the same running statistics
                metric, norm = metric_and_norm(self.graph, self.model, self.source, reference,
                                               None if known is None else (known.value, known.log_value))
            self._cached(("norm", 1.0), lambda: NormValue(*norm))
            return metric

        return self._cached(("metric", reference), compute)

    def generalization_bound(self, n_samples: int, input_bound: float, loss_lipschitz: float = 1.0,
                             sharpened: bool = False) -> GeneralizationBound:
        """The bound of MATH.md section 5 from the current L1 path-norm."""
        graph = self.graph
        if self._constants is None or self._constants[0] is not graph:  # depends on the graph only
            self._constants = (graph, architecture_constants(graph, self.model))
        return assemble_bound(dict(self._constants[1]), self.path_norm(1.0).log_value, n_samples, input_bound,
                              loss_lipschitz, sharpened)

    def snapshot(self) -> ShardedSnapshot:
        """A frozen copy of the current weights and running statistics, sharded like the parameters."""
        modules = {name: submodule(self.model, name) for name in dict.fromkeys(self.graph.affine_modules())}
        with self.source.buffers_held():
            return ShardedSnapshot.take(modules, self.source, sharded=is_sharded(self.model))


def weights_version(model: nn.Module) -> tuple[int, ...]:
    """The identity and version counter of every parameter (and its ZeRO-3 partition or DTensor shard) and
    buffer: a tensor replaced by another (`load_state_dict(..., assign=True)`) changes it too."""
    versions: list[int] = []
    for t in model.buffers():
        versions += [id(t), t._version]
    for p in model.parameters():
        shard = getattr(p, "ds_tensor", None)
        if shard is None and is_dtensor(p):
            shard = p._local_tensor
        versions += [id(p), p._version] + ([-1, -1] if shard is None else [id(shard), shard._version])
    return tuple(versions)


_TRACKED: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, TrackedModel]]" = weakref.WeakKeyDictionary()


def tracked(model: nn.Module, input_shape: Sequence[int], *, synchronized: bool) -> TrackedModel:
    """The shared `TrackedModel` of (model, input_shape, synchronized)."""
    model, shape = unwrapped(model), validated_input_shape(input_shape)
    per_model = _TRACKED.setdefault(model, {})
    key = (shape, synchronized)
    if key not in per_model:
        per_model[key] = TrackedModel(model, shape, synchronized=synchronized)
    return per_model[key]
