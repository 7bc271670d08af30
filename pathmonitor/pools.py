"""Pooling and averaging in the |theta|^q network (MATH.md section 1).

A max-pool neuron has an edge of weight 1 from every position of its window, so in the |theta|^q
network it becomes a SUM over the same window (padding contributes nothing; ceil_mode partial windows
simply have fewer edges). An average-pool neuron is an identity neuron whose edges weigh 1/divisor,
with the divisor of its own window; in the |theta|^q network they weigh (1/divisor)^q. Both are
written as  average(x) * divisor**exponent  with exponent 1 for max and 1 - q for average.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduce = Literal["max", "avg"]

_MAX_POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE_MAX_POOLS = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}
_ADAPTIVE_AVG_POOLS = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
POOL_TYPES = tuple(_MAX_POOLS.values()) + tuple(_AVG_POOLS.values()) + tuple(
    _ADAPTIVE_MAX_POOLS.values()) + tuple(_ADAPTIVE_AVG_POOLS.values())

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL_FUNCTIONS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL_FUNCTIONS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_FUNCTIONS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}

# Positional parameter names of the functional forms, after the input, so that a call can be turned
# into the equivalent module (whose constructor normalizes defaults such as stride=None).
FUNCTIONAL_POOLS = {
    **{F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
       F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
       F.max_pool3d: (nn.MaxPool3d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
       F.avg_pool1d: (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
       F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                     "divisor_override")),
       F.avg_pool3d: (nn.AvgPool3d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                     "divisor_override"))},
    **{fn: (_ADAPTIVE_MAX_POOLS[n], ("output_size", "return_indices"))
       for n, fn in {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}.items()},
    **{fn: (_ADAPTIVE_AVG_POOLS[n], ("output_size",)) for n, fn in _ADAPTIVE_AVG_FUNCTIONS.items()},
}


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _check_batched(x: Tensor, dims: int) -> None:
    if x.dim() != dims + 2:
        raise ValueError(f"a {dims}-d pooling of a tensor of {x.dim()} dimensions: the path model pools (batch, "
                         f"channels, *{dims} spatial) tensors; keep the batch dimension (an unbatched input, or one "
                         f"pooled across its channels, is not supported)")


@dataclass(frozen=True)
class WindowPool:
    """MaxPoolNd / AvgPoolNd: fixed windows."""

    reduce: Reduce
    dims: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: Optional[int]

    def largest_window(self, spatial: tuple[int, ...]) -> int:
        """Number of positions in the largest window."""
        return math.prod(self.kernel_size)

    def magnitudes(self, x: Tensor, q: float) -> Tensor:
        _check_batched(x, self.dims)
        if self.reduce == "max":
            return self._window_sum(x)
        average = _AVG_POOL_FUNCTIONS[self.dims](x, *self._avg_arguments())
        if q == 1:
            return average
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
        divisor = self._window_sum(ones) / _AVG_POOL_FUNCTIONS[self.dims](ones, *self._avg_arguments())
        return average * divisor ** (1 - q)

    def _avg_arguments(self) -> tuple:
        arguments = (self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        return arguments if self.dims == 1 else arguments + (self.divisor_override,)

    def _window_sum(self, x: Tensor) -> Tensor:
        """Sum over each window of real (unpadded) positions, with max-pool windowing rules."""
        pad = self._padding(tuple(x.shape[2:]))
        padded = F.pad(x, pad) if any(pad) else x
        if self.dims > 1 and all(d == 1 for d in self.dilation):  # the same sums, several times faster
            return _AVG_POOL_FUNCTIONS[self.dims](padded, self.kernel_size, self.stride, 0, False, True, 1)
        channels = x.shape[1]
        ones = _ones_kernel((channels, 1) + self.kernel_size, x.dtype, x.device)
        return _CONV[self.dims](padded, ones, None, self.stride, 0, self.dilation, channels)

    @functools.lru_cache(maxsize=64)
    def _padding(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """F.pad's arguments that make every window of the max-pool a full window of a convolution."""
        out_shape = _MAX_POOL_FUNCTIONS[self.dims](
            torch.empty((1, 1) + spatial, device="meta"), self.kernel_size, self.stride,
            self.padding, self.dilation, self.ceil_mode).shape[2:]
        pad = []
        for size, out, k, s, p, d in reversed(list(zip(spatial, out_shape, self.kernel_size, self.stride,
                                                         self.padding, self.dilation))):
            needed = (out - 1) * s + d * (k - 1) + 1
            pad += [p, needed - size - p]  # a negative right pad crops positions no window reaches
        return tuple(pad)  # cached and shared: immutable


@dataclass(frozen=True)
class AdaptivePool:
    """AdaptiveMaxPoolNd / AdaptiveAvgPoolNd: window i spans [floor(i*L/o), ceil((i+1)*L/o))."""

    reduce: Reduce
    dims: int
    output_size: tuple[Optional[int], ...]

    def magnitudes(self, x: Tensor, q: float) -> Tensor:
        _check_batched(x, self.dims)
        average = _ADAPTIVE_AVG_FUNCTIONS[self.dims](x, self.output_size)
        exponent = 1 if self.reduce == "max" else 1 - q
        if exponent == 0:
            return average
        return average * self.divisors(tuple(x.shape[2:]), x) ** exponent

    def largest_window(self, spatial: tuple[int, ...]) -> int:
        """Number of positions in the largest window."""
        return math.prod(max(lengths) for lengths in self.windows(spatial))

    def windows(self, spatial: tuple[int, ...]) -> list[list[int]]:
        """Window lengths per spatial dimension."""
        lengths = []
        for size, out in zip(spatial, self.output_size):
            out = size if out is None else out
            lengths.append([-((-(i + 1) * size) // out) - (i * size) // out for i in range(out)])
        return lengths

    def divisors(self, spatial: tuple[int, ...], like: Tensor) -> Tensor:
        divisor = torch.ones((), dtype=like.dtype, device=like.device)
        for axis, lengths in enumerate(self.windows(spatial)):
            shape = [1] * len(spatial)
            shape[axis] = len(lengths)
            divisor = divisor * torch.tensor(lengths, dtype=like.dtype, device=like.device).view(shape)
        return divisor


@dataclass(frozen=True)
class MeanReduce:
    """Tensor.mean over dimensions: edges of weight 1/N."""

    dim: Optional[Union[int, tuple[int, ...]]]
    keepdim: bool

    def magnitudes(self, x: Tensor, q: float) -> Tensor:
        dims = tuple(range(x.dim())) if self.dim is None else self.dim
        average = x.mean(dims, self.keepdim)
        return average if q == 1 else average * (x.numel() // average.numel()) ** (1 - q)


INTERPOLATION_DIMS = {"linear": 1, "bilinear": 2, "trilinear": 3}


@dataclass(frozen=True)
class Interpolation:
    """Linear / bilinear / trilinear interpolation (F.interpolate, nn.Upsample): a fixed linear map whose
    coefficients are non-negative and, per output position, a product of one 1-D linear interpolation
    weight per spatial axis. In the |theta|^q network every coefficient c becomes c^q, which keeps that
    product form: the map is applied axis by axis with each 1-D weight raised to q. The output size or
    scale factor may be computed during forward; they arrive as arguments of `magnitudes`."""

    dims: int
    align_corners: bool

    def magnitudes(self, x: Tensor, q: float, size=None, scale_factor=None, recompute_scale_factor=None) -> Tensor:
        if q == 1:
            return self._interpolate(x, size, scale_factor, recompute_scale_factor)
        return self.separable(x, q, size, scale_factor, recompute_scale_factor)

    def separable(self, x: Tensor, q: float, size=None, scale_factor=None, recompute_scale_factor=None) -> Tensor:
        """The map with every coefficient raised to q, one spatial axis at a time."""
        size, scale_factor, out = self._per_axis(size), self._per_axis(scale_factor), x
        for axis in range(self.dims):
            weights = self._axis_weights(axis, x.shape[2 + axis], size, scale_factor, recompute_scale_factor,
                                         x.dtype, x.device) ** q  # (out length, in length)
            moved = torch.tensordot(weights, out.movedim(2 + axis, 0), dims=([1], [0]))
            out = moved.movedim(0, 2 + axis)
        return out

    def _per_axis(self, value):
        if value is None or isinstance(value, (tuple, list, torch.Size)):
            return None if value is None else tuple(value)
        return (value,) * self.dims

    def _interpolate(self, x: Tensor, size, scale_factor, recompute_scale_factor) -> Tensor:
        mode = next(name for name, dims in INTERPOLATION_DIMS.items() if dims == self.dims)
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=self.align_corners,
                             recompute_scale_factor=recompute_scale_factor)

    @functools.lru_cache(maxsize=64)
    def _axis_weights(self, axis: int, length: int, size, scale_factor, recompute_scale_factor,
                      dtype: torch.dtype, device: torch.device) -> Tensor:
        """The 1-D interpolation weights of one axis, read off PyTorch's own linear interpolation of the
        unit vectors (the same source-index rule, per axis, as its bilinear and trilinear)."""
        units = torch.eye(length, dtype=dtype, device=device).unsqueeze(1)  # (length, 1, length)
        along = F.interpolate(units, size=None if size is None else size[axis],
                              scale_factor=None if scale_factor is None else scale_factor[axis], mode="linear",
                              align_corners=self.align_corners, recompute_scale_factor=recompute_scale_factor)
        return along[:, 0, :].T.contiguous()  # cached and shared: never written to


Pool = Union[WindowPool, AdaptivePool, MeanReduce, Interpolation]


def pool_from_module(module: nn.Module) -> Pool:
    """The pool spec of a pooling module (its return_indices is checked by the caller)."""
    for dims, cls in _MAX_POOLS.items():
        if isinstance(module, cls):
            return WindowPool("max", dims, _tuple(module.kernel_size, dims), _tuple(module.stride, dims),
                              _tuple(module.padding, dims), _tuple(module.dilation, dims),
                              bool(module.ceil_mode), True, None)
    for dims, cls in _AVG_POOLS.items():
        if isinstance(module, cls):
            return WindowPool("avg", dims, _tuple(module.kernel_size, dims), _tuple(module.stride, dims),
                              _tuple(module.padding, dims), (1,) * dims, bool(module.ceil_mode),
                              bool(module.count_include_pad), getattr(module, "divisor_override", None))
    for reduce, table in (("max", _ADAPTIVE_MAX_POOLS), ("avg", _ADAPTIVE_AVG_POOLS)):
        for dims, cls in table.items():
            if isinstance(module, cls):
                return AdaptivePool(reduce, dims, _tuple(module.output_size, dims))
    raise TypeError(f"{type(module).__name__} is not a pooling module")


@functools.lru_cache(maxsize=64)
def _ones_kernel(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A kernel of ones, built once per shape: convolutions only read it."""
    return torch.ones(shape, dtype=dtype, device=device)
