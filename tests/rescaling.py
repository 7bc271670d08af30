"""Function-preserving neuron-wise rescalings for tests (MATH.md section 2)."""
from __future__ import annotations

import torch
from torch import nn

BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def scale_outgoing_channel(producer: nn.Module, channel: int, factor: float) -> None:
    """Multiply the incoming weights and bias of output channel `channel` of `producer` by `factor`."""
    producer.weight[channel] *= factor
    if producer.bias is not None:
        producer.bias[channel] *= factor


@torch.no_grad()
def unscale_incoming_channel(consumer: nn.Module, channel: int, factor: float, block: int = 1) -> None:
    """Compensate, in `consumer`, an input channel that was multiplied by `factor`.

    `block` is the number of consecutive input features per channel (a Linear after a flatten)."""
    if isinstance(consumer, BN):  # the running statistics absorb the factor
        consumer.running_var[channel] = factor ** 2 * (consumer.running_var[channel] + consumer.eps) - consumer.eps
        consumer.running_mean[channel] *= factor
    elif isinstance(consumer, nn.Linear):
        consumer.weight[:, channel * block:(channel + 1) * block] /= factor
    else:  # Conv: input channel `channel` lives in one group
        per_group = consumer.weight.shape[1]
        group, local = divmod(channel, per_group)
        outputs = consumer.weight.shape[0] // consumer.groups
        consumer.weight[group * outputs:(group + 1) * outputs, local] /= factor


def rescale_pair(producer: nn.Module, consumer: nn.Module, generator: torch.Generator,
                 factors=(1 / 4096, 1 / 128, 1.0, 128.0, 4096.0), block: int = 1) -> None:
    """A random factor for every channel between `producer` and `consumer`, which must be separated
    only by ReLU, pooling and re-indexing."""
    channels = producer.weight.shape[0]
    for c in range(channels):
        factor = factors[int(torch.randint(len(factors), (1,), generator=generator))]
        scale_outgoing_channel(producer, c, factor)
        unscale_incoming_channel(consumer, c, factor, block)
