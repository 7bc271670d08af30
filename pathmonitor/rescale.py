"""Random function-preserving neuron-wise rescaling (MATH.md sections 2 and 4).

Multiplying the incoming weights and the bias of a hidden channel by lambda > 0 and its outgoing
weights by 1/lambda leaves the function and every path product unchanged; plain weight magnitudes do
change, which is what breaks magnitude pruning.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .graph import OpKind, PathGraph, topology
from .layers import BATCH_NORMS, TRANSPOSED_CONVOLUTIONS
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


def scale_output_channels(module: nn.Module, factors: Tensor) -> None:
    """Multiply the incoming weights and bias of every output channel c by factors[c]."""
    weight = module.weight
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):  # weight: (in, out/groups, *k)
        grouped = _grouped(weight.data, module.groups)
        grouped.mul_(factors.view(module.groups, 1, -1, *([1] * (weight.dim() - 2))).to(weight.dtype))
    else:
        weight.data.mul_(factors.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
    if module.bias is not None:
        module.bias.data.mul_(factors.to(module.bias.dtype))


def compensate_input_channels(module: nn.Module, factors: Tensor) -> None:
    """Undo, inside `module`, a multiplication of its input channel c by factors[c]."""
    if isinstance(module, BATCH_NORMS):  # the running statistics absorb the factor exactly
        module.running_var.copy_(factors ** 2 * (module.running_var + module.eps) - module.eps)
        module.running_mean.mul_(factors.to(module.running_mean.dtype))
        return
    weight = module.weight
    if isinstance(module, nn.Linear):
        weight.data.div_(factors.view(1, -1).to(weight.dtype))
    elif isinstance(module, TRANSPOSED_CONVOLUTIONS):  # input channel c is weight[c]
        weight.data.div_(factors.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
    else:  # Conv: input channel g*in_per_group + j feeds the outputs of group g through weight[..., j]
        grouped = _grouped(weight.data, module.groups)
        grouped.div_(factors.view(module.groups, 1, -1, *([1] * (weight.dim() - 2))).to(weight.dtype))


def rescalable_pairs(graph: PathGraph, model: nn.Module) -> list[tuple[str, list[str]]]:
    """(producer, consumers) for every affine module whose output channels reach only affine modules,
    through ReLU, dropout, identity, constant scaling and max / average pooling."""
    users: dict[int, list[int]] = {}
    for i, op in enumerate(graph.ops):
        for ref in op.refs():
            users.setdefault(ref.index, []).append(i)
    calls = Counter(graph.affine_modules())
    pairs = []
    for i, op in enumerate(graph.ops):
        if op.kind is not OpKind.AFFINE or calls[op.target] > 1:
            continue
        producer = model.get_submodule(op.target)
        if isinstance(producer, BATCH_NORMS) and not producer.affine:
            continue
        consumers, frontier, admissible = [], list(users.get(i, [])), True
        while frontier and admissible:
            index = frontier.pop()
            user = graph.ops[index]
            if user.kind in _CHANNEL_PRESERVING or (user.kind is OpKind.POOL and not isinstance(user.pool, MeanReduce)):
                frontier += users.get(index, [])
            elif user.kind is OpKind.AFFINE and calls[user.target] == 1 and \
                    _channels_last(model.get_submodule(user.target)) == _channels_last(producer):
                consumers.append(user.target)
            else:
                admissible = False
        if admissible and consumers:
            pairs.append((op.target, sorted(set(consumers))))
    return pairs


def random_rescale(model: nn.Module, factors: Sequence[float] = (1, 128, 4096),
                   generator: Optional[torch.Generator] = None) -> nn.Module:
    """A copy of `model` in which every hidden channel that admits a simple function-preserving
    rescaling (see `rescalable_pairs`) is multiplied by a factor drawn from `factors` (MATH.md §4)."""
    if not factors or any(not (isinstance(f, (int, float)) and f > 0) for f in factors):
        raise ValueError(f"factors must be positive numbers, got {factors!r}")
    model = unwrapped(model)
    rescaled = copy.deepcopy(model)
    choices = torch.tensor([float(f) for f in factors], dtype=torch.float64)
    with torch.no_grad():
        for producer_name, consumer_names in rescalable_pairs(topology(model), model):
            producer = rescaled.get_submodule(producer_name)
            picks = torch.randint(len(choices), (_output_channels(producer),), generator=generator)
            lam = choices[picks]
            for name in consumer_names:  # a batch-norm variance must stay non-negative
                consumer = rescaled.get_submodule(name)
                if isinstance(consumer, BATCH_NORMS):
                    lam = torch.where(lam ** 2 * (consumer.running_var.double() + consumer.eps) - consumer.eps < 0,
                                      torch.ones_like(lam), lam)
            scale_output_channels(producer, lam)
            for name in consumer_names:
                compensate_input_channels(rescaled.get_submodule(name), lam)
    return rescaled


def _output_channels(module: nn.Module) -> int:
    for attribute in ("out_features", "out_channels", "num_features"):
        if hasattr(module, attribute):
            return getattr(module, attribute)
    raise TypeError(f"{type(module).__name__} has no output channels")
