"""Random small ReLU DAGs for the oracle: random compositions of every supported layer, skips and
concatenations, with random hyper-parameters (strides, padding, dilation, groups, ceil_mode, ...)."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from nets import randomize_batch_norms
from oracle import Add, Cat, Fn, Sub


def _shape_after(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(layer.eval()(torch.zeros((1,) + shape)).shape[1:])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _leaf(rng: random.Random, shape: tuple[int, int, int]) -> nn.Module:
    """One random layer that accepts `shape` (C, H, W) and leaves at least a 1x1 map."""
    c, h, w = shape
    smallest = min(h, w)
    kinds = ["conv", "bn", "relu", "identity", "scale"]
    if smallest >= 2:
        kinds += ["maxpool", "avgpool", "adaptive", "convT", "dilated"]
    if smallest <= 3:
        kinds += ["upsample", "convT"]
    kind = rng.choice(kinds)
    if kind in ("conv", "dilated"):
        out = rng.randint(1, 3)
        groups = rng.choice([g for g in _divisors(c) if out % g == 0])
        k = rng.randint(1, min(3, smallest))
        dilation = 2 if kind == "dilated" and 2 * (k - 1) + 1 <= smallest + 2 * (k // 2) else 1
        return nn.Conv2d(c, out, k, stride=rng.choice([1, 1, 2]), padding=rng.randint(0, k // 2),
                         dilation=dilation, groups=groups, bias=rng.random() < 0.7)
    if kind == "convT":
        out = rng.randint(1, 3)
        groups = rng.choice([g for g in _divisors(c) if out % g == 0])
        k = rng.randint(1, 3)
        stride = rng.randint(1, 2)
        return nn.ConvTranspose2d(c, out, k, stride=stride, padding=rng.randint(0, (k - 1) // 2),
                                  output_padding=rng.randint(0, stride - 1), groups=groups, bias=rng.random() < 0.5)
    if kind == "bn":
        return nn.BatchNorm2d(c, affine=rng.random() < 0.8)
    if kind == "relu":
        return nn.ReLU(inplace=rng.random() < 0.5)
    if kind == "identity":
        return rng.choice([nn.Identity(), nn.Dropout(0.3)])
    if kind == "scale":
        factor = rng.choice([0.5, -2.0, 3.0])
        return Fn(lambda x, factor=factor: x * factor)
    if kind == "maxpool":
        k = rng.randint(2, min(3, smallest))
        padding = rng.randint(0, k // 2)
        dilation = rng.choice([1, 1, 2]) if smallest >= 2 * (k - 1) + 1 - 2 * padding else 1
        return nn.MaxPool2d(k, stride=rng.randint(1, 2), padding=padding, dilation=dilation,
                            ceil_mode=rng.random() < 0.5)
    if kind == "avgpool":
        k = rng.randint(2, min(3, smallest))
        return nn.AvgPool2d(k, stride=rng.randint(1, 2), padding=rng.randint(0, k // 2), ceil_mode=rng.random() < 0.5,
                            count_include_pad=rng.random() < 0.5,
                            divisor_override=rng.choice([None, None, 2]))
    if kind == "adaptive":
        size = (rng.randint(1, h), rng.randint(1, w))
        return rng.choice([nn.AdaptiveAvgPool2d(size), nn.AdaptiveMaxPool2d(size)])
    return nn.Upsample(scale_factor=2, mode="nearest")


def _block(rng: random.Random, shape: tuple[int, int, int], depth: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """A random block and its output shape: a chain of leaves, a residual add, or a concatenation."""
    choice = rng.random()
    if depth > 0 and choice < 0.25:  # residual: a shape-preserving branch added to a skip
        c = shape[0]
        branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), *([nn.BatchNorm2d(c)] if rng.random() < 0.5 else []),
                               nn.ReLU(), nn.Conv2d(c, c, 1, bias=rng.random() < 0.5))
        skip = rng.choice([nn.Identity(), nn.Conv2d(c, c, 1)])
        return (Add(branch, skip) if rng.random() < 0.8 else Sub(branch, skip)), shape
    if depth > 0 and choice < 0.45:  # concatenation of two branches brought to one spatial size
        first, first_shape = _block(rng, shape, depth - 1)
        size = first_shape[1:]
        second = nn.Sequential(nn.Conv2d(shape[0], rng.randint(1, 2), 1), nn.ReLU(), nn.AdaptiveAvgPool2d(size))
        return Cat(first, second), (first_shape[0] + second[0].out_channels,) + size
    layers = []
    for _ in range(rng.randint(1, 3)):
        layer, shape = _valid_leaf(rng, shape)
        layers.append(layer)
    return nn.Sequential(*layers), shape


def _valid_leaf(rng: random.Random, shape: tuple[int, int, int]) -> tuple[nn.Module, tuple[int, int, int]]:
    """A random leaf whose output map stays between 1x1 and 8x8 (drawing again when it would not)."""
    for _ in range(20):
        layer = _leaf(rng, shape)
        try:
            out = _shape_after(layer, shape)
        except RuntimeError:  # e.g. a kernel larger than the padded input
            continue
        if all(1 <= size <= 8 for size in out[1:]):
            return layer, out
    return nn.ReLU(), shape


def random_net(seed: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """A random network on a small random input shape, with random weights and batch-norm statistics."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    shape = (rng.randint(1, 2), rng.randint(3, 6), rng.randint(3, 6))
    blocks, current = [], shape
    for _ in range(rng.randint(1, 3)):
        block, current = _block(rng, current, depth=2)
        blocks.append(block)
    features = current[0] * current[1] * current[2]
    head = [Fn(lambda x: torch.flatten(x, 1)), nn.Linear(features, rng.randint(1, 3))]
    if rng.random() < 0.3:
        head = [Fn(lambda x: F.adaptive_max_pool2d(x, 1).flatten(1)), nn.Linear(current[0], 2)]
    net = nn.Sequential(*blocks, *head)
    with torch.no_grad():
        randomize_batch_norms(net, torch.Generator().manual_seed(seed))
    return net.eval(), shape
