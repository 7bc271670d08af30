"""Where the engine gets edge weights from (DESIGN.md layer 4).

A `ParameterSource` hands out the full tensors of one module at a time, inside a context, so that a
sharded source (DeepSpeed ZeRO-3, FSDP2) can gather a module's parameters and free them right after.
`EdgeMagnitudes` turn those tensors into the non-negative edge weights of the |theta|^q network.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn

from .layers import edge_parameters, tensor_names

Tensors = Mapping[str, Optional[Tensor]]


class ParameterSource(Protocol):
    def tensors(self, name: str, module: nn.Module) -> contextlib.AbstractContextManager[Tensors]:
        """Full tensors named by `layers.tensor_names(module)` of the module called `name`."""


class ModuleSource:
    """The module's own tensors, as they are in memory (single process, DDP, ZeRO-1/2)."""

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[Tensors]:
        # getattr, not named_parameters: a parametrized or pruned module exposes its effective weight
        yield {key: getattr(module, key, None) for key in tensor_names(module)}


class MetaSource:
    """Empty tensors of the right shapes on the meta device, for a shape-only dry run."""

    @contextlib.contextmanager
    def tensors(self, name: str, module: nn.Module) -> Iterator[Tensors]:
        found = {key: getattr(module, key, None) for key in tensor_names(module)}
        yield {key: None if t is None else torch.empty(_full_shape(t), dtype=torch.float64, device="meta")
               for key, t in found.items()}


def _full_shape(tensor: Tensor) -> tuple[int, ...]:
    """The shape of the whole parameter, also when only a shard is held locally (ZeRO-3: ds_shape)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


class EdgeMagnitudes(Protocol):
    def affine(self, name: str, module: nn.Module) -> contextlib.AbstractContextManager[tuple[Tensor, Optional[Tensor]]]:
        """Non-negative float64 (edge weights, biases) of the affine module `name` in the |theta|^q network."""


class PowerMagnitudes:
    """|w|^q and |b|^q of one parameter source: the |theta|^q network of MATH.md section 2."""

    def __init__(self, source: ParameterSource, q: float):
        self.source = source
        self.q = q

    def _power(self, t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        magnitude = t.abs().to(torch.float64)
        return magnitude if self.q == 1 else magnitude.pow(self.q)

    @contextlib.contextmanager
    def affine(self, name: str, module: nn.Module) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        with self.source.tensors(name, module) as tensors:
            weight, bias = edge_parameters(module, tensors)
            yield self._power(weight), self._power(bias)
