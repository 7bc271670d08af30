"""Random pairs of networks of one architecture: pruned, same-sign, and arbitrary."""
from __future__ import annotations

import copy

import torch
from torch import nn

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d, nn.modules.batchnorm._BatchNorm)


def perturbed(net: nn.Module, kind: str, generator: torch.Generator) -> nn.Module:
    """A copy of `net` whose parameters are
    - "pruning": zeroed at random (30%) and otherwise shrunk by a factor in [0, 1];
    - "same_sign": multiplied by factors in [0, 2], some zeroed;
    - "general": moved by Gaussian noise, which flips some signs.
    A batch-norm's weight and bias share one factor per channel, so that its folded coordinates
    a = weight/sqrt(var+eps) and c = bias - mean*a move by that factor too."""
    other = copy.deepcopy(net)
    with torch.no_grad():
        for module in other.modules():
            if not isinstance(module, AFFINE) or module.weight is None:
                continue
            batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            for p in (module.weight, module.bias):
                if p is None:
                    continue
                if kind == "general":
                    p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * p.abs().mean())
                    continue
                if p is module.weight or not batch_norm:
                    u = torch.rand(p.shape, generator=generator, dtype=p.dtype)
                    keep = (torch.rand(p.shape, generator=generator) > 0.3).to(p.dtype)
                    factor = keep * u * (1 if kind == "pruning" else 2)
                p.mul_(factor)
    return other
