"""Random function-preserving neuron-wise rescaling (MATH.md sections 2 and 4).

Multiplying the incoming weights and the bias of a hidden channel by lambda > 0 and its outgoing
weights by 1/lambda leaves the function and every path product unchanged; plain weight magnitudes do
change, which is what breaks magnitude pruning.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .graph import OpKind, PathGraph, PathOp, capture, topology
from .layers import BATCH_NORMS, CONVOLUTIONS, TRANSPOSED_CONVOLUTIONS, tensor_holders
from .norms import unwrapped
from .pools import MeanReduce

# Ops through which a per-channel positive factor passes unchanged.
_CHANNEL_PRESERVING = (OpKind.IDENTITY, OpKind.SCALE)


def _channels_last(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _grouped(weight: Tensor, groups: int) -> Tensor:
    """A conv weight viewed as (groups, out_per_group, in_per_group, *k); for a transposed conv,
    (groups, in_per_group, out_per_group, *k)."""
    return weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])


def _stored(module: nn.Module, name: str, key: str) -> Optional[Tensor]:
    """The tensor that holds a module's `key` and survives the next forward: `weight_orig` for a
    module pruned with torch.nn.utils.prune (its mask commutes with channel scaling)."""
    recomputed = any(isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == key
                     for hook in module._forward_pre_hooks.values())
    if parametrize.is_parametrized(module, key) or recomputed:
        raise ValueError(f"module {name!r} ({type(module).__name__}) has a parametrized {key} (or one weight_norm "
                         f"or spectral_norm recomputes at every forward); random_rescale cannot rescale it")
    original = getattr(module, f"{key}_orig", None)
    stored = original if isinstance(original, Tensor) else getattr(module, key, None)
    return None if stored is None else stored.data


def scale_output_channels(module: nn.Module, factors: Tensor, name: str = "") -> None:
    """Multiply the incoming weights and bias of every output channel c by factors[c]."""
    weight, bias = _stored(module, name, "weight"), _stored(module, name, "bias")
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):  # weight: (in, out/groups, *k)
        grouped = _grouped(weight, module.groups)
        grouped.mul_(factors.view(module.groups, 1, -1, *([1] * (weight.dim() - 2))).to(weight.dtype))
    else:
        weight.mul_(factors.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
    if bias is not None:
        bias.mul_(factors.to(bias.dtype))


def compensate_input_channels(module: nn.Module, factors: Tensor, name: str = "") -> None:
    """Undo, inside `module`, a multiplication of its input channel c by factors[c]."""
    if isinstance(module, BATCH_NORMS):  # the running statistics absorb the factor exactly
        module.running_var.copy_(factors ** 2 * (module.running_var + module.eps) - module.eps)
        module.running_mean.mul_(factors.to(module.running_mean.dtype))
        return
    weight = _stored(module, name, "weight")
    if isinstance(module, nn.Linear):
        weight.div_(factors.view(1, -1).to(weight.dtype))
    elif isinstance(module, TRANSPOSED_CONVOLUTIONS):  # input channel c is weight[c]
        weight.div_(factors.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
    else:  # Conv: input channel g*in_per_group + j feeds the outputs of group g through weight[..., j]
        grouped = _grouped(weight, module.groups)
        grouped.div_(factors.view(module.groups, 1, -1, *([1] * (weight.dim() - 2))).to(weight.dtype))


def rescalable_pairs(graph: PathGraph, model: nn.Module) -> list[tuple[str, list[str]]]:
    """(producer, consumers) for every affine module whose output channels reach only affine modules,
    through ReLU, dropout, identity, constant scaling and max / average pooling."""
    users: dict[int, list[int]] = {}
    for i, op in enumerate(graph.ops):
        for ref in op.refs():
            users.setdefault(ref.index, []).append(i)
    calls = Counter(graph.affine_modules())
    tied = _holding_tied_tensors(model, calls)
    pairs = []
    for i, op in enumerate(graph.ops):
        if op.kind is not OpKind.AFFINE or calls[op.target] > 1 or op.target in tied or not _layer_layout(op, model):
            continue
        producer = model.get_submodule(op.target)
        if isinstance(producer, BATCH_NORMS) and not producer.affine:
            continue
        # pools act on the dimensions after the channels: safe only where channels sit in dim 1 of a
        # tensor with spatial dimensions (not a Linear's, nor a BatchNorm1d's), and pool exactly those
        spatial = _spatial_dims(producer)
        consumers, frontier, admissible = [], list(users.get(i, [])), True
        while frontier and admissible:
            index = frontier.pop()
            user = graph.ops[index]
            if user.kind in _CHANNEL_PRESERVING or (
                    user.kind is OpKind.POOL and not isinstance(user.pool, MeanReduce) and user.pool.dims == spatial):
                frontier += users.get(index, [])
            elif user.kind is OpKind.AFFINE and calls[user.target] == 1 and user.target not in tied and \
                    _layer_layout(user, model) and \
                    _channels_last(model.get_submodule(user.target)) == _channels_last(producer):
                consumers.append(user.target)
            else:
                admissible = False
        if admissible and consumers:
            pairs.append((op.target, sorted(set(consumers))))
    return pairs


def _spatial_dims(module: nn.Module) -> int:
    """The spatial dimensions of a conv's or a 2-d / 3-d batch-norm's output (0 for any other layer)."""
    if isinstance(module, CONVOLUTIONS + TRANSPOSED_CONVOLUTIONS):
        return len(module.kernel_size)
    return 2 if isinstance(module, nn.BatchNorm2d) else 3 if isinstance(module, nn.BatchNorm3d) else 0


def _holding_tied_tensors(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The modules among `names` holding a tensor another module holds too (tied): scaling it would
    scale the other's."""
    holders = tensor_holders(model)

    def tied(module: nn.Module) -> bool:
        return any(len(holders.get(id(t), ())) > 1 for t in (*module._parameters.values(), *module._buffers.values()))

    return {name for name in names if tied(model.get_submodule(name))}


def _layer_layout(op: PathOp, model: nn.Module) -> bool:
    """Whether an affine op lays out channels as its layer does (a functional call may group them otherwise)."""
    return op.fn is None or op.fn.keeps_channel_layout(model.get_submodule(op.target))


def random_rescale(model: nn.Module, factors: Sequence[float] = (1, 128, 4096),
                   generator: Optional[torch.Generator] = None,
                   input_shape: Optional[tuple[int, ...]] = None) -> nn.Module:
    """A copy of `model` in which every hidden channel that admits a simple function-preserving
    rescaling (see `rescalable_pairs`) is multiplied by a factor drawn from `factors` (MATH.md §4).
    `input_shape` is needed only by models whose forward branches on the shape of its input."""
    if not factors or any(not (isinstance(f, (int, float)) and f > 0) for f in factors):
        raise ValueError(f"factors must be positive numbers, got {factors!r}")
    model = unwrapped(model)
    try:
        rescaled = copy.deepcopy(model)
    except RuntimeError as error:
        raise ValueError(f"random_rescale works on a copy, and this model cannot be copied ({error}). A model "
                         f"pruned with torch.nn.utils.prune can be copied after a forward pass run under "
                         f"torch.no_grad().") from error
    choices = torch.tensor([float(f) for f in factors], dtype=torch.float64)
    with torch.no_grad():
        graph = topology(model) if input_shape is None else capture(model, tuple(input_shape))
        for producer_name, consumer_names in rescalable_pairs(graph, model):
            producer = rescaled.get_submodule(producer_name)
            picks = torch.randint(len(choices), (_output_channels(producer),), generator=generator)
            lam = choices[picks]
            for name in consumer_names:  # a batch-norm variance must stay non-negative
                consumer = rescaled.get_submodule(name)
                if isinstance(consumer, BATCH_NORMS):
                    lam = torch.where(lam ** 2 * (consumer.running_var.double() + consumer.eps) - consumer.eps < 0,
                                      torch.ones_like(lam), lam)
            scale_output_channels(producer, lam, producer_name)
            for name in consumer_names:
                compensate_input_channels(rescaled.get_submodule(name), lam, name)
        for module in rescaled.modules():  # pruned weights are recomputed by their hook: refresh them now
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    hook(module, None)
    return rescaled


def _output_channels(module: nn.Module) -> int:
    for attribute in ("out_features", "out_channels", "num_features"):
        if hasattr(module, attribute):
            return getattr(module, attribute)
    raise TypeError(f"{type(module).__name__} has no output channels")
