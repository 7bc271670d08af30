"""Affine layers of the path model: their edge weights, biases, and how they act (MATH.md section 1).

A Linear, Conv or ConvTranspose layer contributes its weight as edge weights (a conv weight is shared
by many edges; padding means missing edges) and its bias as neuron biases. A batch-norm layer, always
with its running statistics, is the per-channel affine map y = a*x + c with a = gamma/sqrt(var+eps)
and c = beta - mean*a.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
AFFINE_TYPES = (nn.Linear,) + CONVOLUTIONS + TRANSPOSED_CONVOLUTIONS + BATCH_NORMS

_TRANSPOSED_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

_WEIGHTED_TENSORS = ("weight", "bias")
_BATCH_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
_CONVOLUTION_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSED_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
# functional forms of the affine layers: the layer types whose tensors they may apply, their parameters in
# order, and which of those are the layer's tensors
FUNCTIONAL_AFFINE: dict[Callable, tuple[tuple[type, ...], tuple[str, ...], tuple[str, ...]]] = {
    F.linear: ((nn.Linear,), ("input", "weight", "bias"), _WEIGHTED_TENSORS),
    F.conv1d: ((nn.Conv1d,), _CONVOLUTION_ARGUMENTS, _WEIGHTED_TENSORS),
    F.conv2d: ((nn.Conv2d,), _CONVOLUTION_ARGUMENTS, _WEIGHTED_TENSORS),
    F.conv3d: ((nn.Conv3d,), _CONVOLUTION_ARGUMENTS, _WEIGHTED_TENSORS),
    F.conv_transpose1d: ((nn.ConvTranspose1d,), _TRANSPOSED_ARGUMENTS, _WEIGHTED_TENSORS),
    F.conv_transpose2d: ((nn.ConvTranspose2d,), _TRANSPOSED_ARGUMENTS, _WEIGHTED_TENSORS),
    F.conv_transpose3d: ((nn.ConvTranspose3d,), _TRANSPOSED_ARGUMENTS, _WEIGHTED_TENSORS),
    F.batch_norm: (BATCH_NORMS, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
                                 "eps"), _BATCH_NORM_TENSORS),
}


@dataclass(frozen=True)
class FunctionalAffine:
    """A layer's own weight and bias applied by a functional call with the call's own settings
    (stride, padding, dilation, groups): the affine map an overridden forward computes."""

    function: Callable
    settings: Mapping[str, Any]

    def __call__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return self.function(x, weight, bias, **self.settings)

    def keeps_channel_layout(self, module: nn.Module) -> bool:
        """Whether the call groups channels as the layer does, so a rescaling of the layer's channels
        is one of the call's."""
        return self.settings.get("groups", 1) == getattr(module, "groups", 1)


def parameter_name(module_name: str, key: str) -> str:
    """Qualified name of tensor `key` of the module called `module_name` ("" for the root)."""
    return f"{module_name}.{key}" if module_name else key


def tensor_holders(model: nn.Module) -> dict[int, list[str]]:
    """For every parameter and buffer of `model` (by id), the qualified names under which distinct modules
    hold it: more than one means tied tensors (a module registered under two names counts once)."""
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for key, t in (*module._parameters.items(), *module._buffers.items()):
            if t is not None:
                holders.setdefault(id(t), []).append(parameter_name(module_name, key))
    return holders


def tensor_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the tensors of `module` that define its edge weights and biases."""
    return _BATCH_NORM_TENSORS if isinstance(module, BATCH_NORMS) else _WEIGHTED_TENSORS


def edge_parameters(module: nn.Module, tensors: Mapping[str, Optional[Tensor]]) -> tuple[Tensor, Optional[Tensor]]:
    """Signed (edge weights, biases) of an affine module; batch-norm is folded to (a, c) in float64.

    Linear and conv tensors keep their stored dtype: callers take magnitudes before widening to
    float64, which halves the memory traffic of the conversion."""
    weight, bias = tensors["weight"], tensors.get("bias")
    if isinstance(module, BATCH_NORMS):
        mean = tensors["running_mean"].to(torch.float64)
        scale = torch.rsqrt(tensors["running_var"].to(torch.float64) + module.eps)
        a = scale if weight is None else weight.to(torch.float64) * scale
        c = -mean * a if bias is None else bias.to(torch.float64) - mean * a
        return a, c
    return weight, bias


def apply_affine(module: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The module's own affine map with the given edge weights and biases in place of its parameters."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, CONVOLUTIONS):
        return module._conv_forward(x, weight, bias)  # honours every padding_mode exactly as the module does
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):
        transposed = _TRANSPOSED_FUNCTIONS[len(module.kernel_size)]
        return transposed(x, weight, bias, module.stride, module.padding, module.output_padding,
                          module.groups, module.dilation)
    if x.is_meta:  # shapes only: batch_norm on meta tensors runs a slow Python decomposition
        if x.dim() < 2 or x.shape[1] != weight.shape[0]:
            raise ValueError(f"expected an input with {weight.shape[0]} channels in dimension 1, got shape "
                             f"{tuple(x.shape)}")
        scaled = x * bias_view(module, weight, x.dim())
        return scaled if bias is None else scaled + bias_view(module, bias, x.dim())
    # batch-norm with unit variance and zero mean is exactly x * weight + bias, in one fused kernel
    channels = weight.shape[0]
    zeros = torch.zeros(channels, dtype=x.dtype, device=x.device)
    ones = torch.ones(channels, dtype=x.dtype, device=x.device)
    return F.batch_norm(x, zeros, ones, weight, bias, False, 0.0, 0.0)


def bias_view(module: nn.Module, bias: Tensor, ndim: int) -> Tensor:
    """`bias` shaped to broadcast against the module's output of `ndim` dimensions."""
    if isinstance(module, nn.Linear):
        return bias.view(*([1] * (ndim - 1)), -1)
    return bias.view(1, -1, *([1] * (ndim - 2)))


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why an affine module cannot be evaluated as a path op, or None if it can."""
    if isinstance(module, BATCH_NORMS) and (module.running_mean is None or module.running_var is None):
        return ("batch-norm without running statistics (track_running_stats=False) normalizes by "
                "batch statistics, which is not an affine map of the frozen network")
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module with uninitialized parameters: run one forward pass first"
    return None
