"""Small random networks that cover every op the engine supports, built for the oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oracle import Add, Cat, Fn, Heads, Sub


def randomize_batch_norms(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every batch-norm random running statistics (and affine parameters, when it has them)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator))
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=generator))
                m.bias.data.copy_(torch.randn(c, generator=generator))
    return net


def _shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _chunk_swap(x):
    a, b = x.chunk(2, dim=1)
    return torch.cat([F.relu(b, inplace=True), a * 0.5], dim=1)


def conv_pool_chain():
    """Strided conv, BN, ceil-mode max-pool with padding, dilated grouped conv, avg-pool without
    padding counted, uneven adaptive average pool, flatten, linear."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.AdaptiveAvgPool2d((3, 2)), nn.Flatten(), nn.Linear(24, 5), nn.ReLU(), nn.Linear(5, 3),
    ), (2, 9, 11)


def residual_concat():
    """Residual add with a BN branch, concatenation of adaptive max and average pools, view."""
    block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 3, 3, padding=1))
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(),
        Add(block, nn.Identity()), nn.ReLU(),
        Cat(nn.AdaptiveMaxPool2d((3, 3)), nn.AdaptiveAvgPool2d((3, 3)),
            nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 0))),
        Fn(lambda x: x.view(x.size(0), -1)), nn.Linear(81, 4),
    ), (2, 7, 6)


def unet_like():
    """Encoder / decoder with transposed convs, nearest upsampling, skip concatenation, mean."""
    down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(4, 3, 2, stride=2))
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        Cat(down, nn.Identity()),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2), nn.ReLU(),
        Fn(lambda x: x.mean((2, 3))), nn.Linear(4, 2),
    ), (1, 4, 6)


def functional_ops():
    """F.relu in place, scaling, channel shuffle, chunk, functional pools with dilation and
    divisor_override, nearest interpolation, subtraction, BN without affine parameters, reflect and
    circular padding (explicit, so that the oracle sees the copied neurons as distinct)."""
    return nn.Sequential(
        Fn(lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect")), nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=False),
        Fn(lambda x: F.relu(x, inplace=True) / 4), Fn(_shuffle), Fn(_chunk_swap),
        Fn(lambda x: F.max_pool2d(x, 2, stride=1, dilation=2, ceil_mode=True)),
        Fn(lambda x: F.interpolate(x, scale_factor=2)),
        Fn(lambda x: F.pad(x, (1, 1, 1, 1), mode="circular")), nn.Conv2d(4, 4, 3, bias=False),
        Fn(lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, divisor_override=3)),
        Sub(nn.Conv2d(4, 2, 1), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1))),
        Fn(lambda x: torch.flatten(F.adaptive_max_pool2d(x, 2), 1)), nn.Dropout(0.5), nn.Linear(8, 2),
    ), (2, 6, 5)


def one_dimensional():
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.BatchNorm1d(3), nn.ReLU(),
        nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True), nn.ConvTranspose1d(3, 2, 3, stride=2),
        nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True), nn.AdaptiveMaxPool1d(3), nn.Flatten(),
        nn.Linear(6, 2), nn.BatchNorm1d(2),
    ), (2, 13)


def three_dimensional():
    return nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.ReLU(), nn.MaxPool3d(2, stride=1, padding=1),
        nn.AvgPool3d(2, ceil_mode=True, padding=1), nn.ConvTranspose3d(2, 2, 2, stride=2),
        nn.BatchNorm3d(2), nn.AdaptiveAvgPool3d((1, 2, 1)), nn.Flatten(), nn.Linear(4, 2),
    ), (1, 3, 4, 3)


def two_heads():
    trunk = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
    return Heads(trunk, nn.Linear(4, 2), nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))), (5,)


def tiny_residual():
    """Small enough to enumerate every path."""
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), Add(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()),
                                                             nn.Identity()),
                         nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(2, 2)), (1, 3, 3)


def tiny_conv():
    """Small enough to enumerate every path: conv, BN, max-pool, average-pool, linear."""
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2, stride=1),
                         nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False), nn.Flatten(),
                         nn.Linear(18, 2)), (1, 4, 4)


def small_unet():
    """Two-level U-Net: double conv blocks, max-pool down, transposed conv up, skip concatenation."""
    def double_conv(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
    inner = nn.Sequential(nn.MaxPool2d(2), double_conv(4, 8), nn.ConvTranspose2d(8, 4, 2, stride=2))
    return nn.Sequential(double_conv(2, 4), Cat(inner, nn.Identity()), double_conv(8, 4), nn.Conv2d(4, 3, 1)), (2, 8, 8)


ORACLE_NETS = {f.__name__: f for f in (conv_pool_chain, residual_concat, unet_like, functional_ops,
                                       one_dimensional, three_dimensional, two_heads, tiny_residual, tiny_conv,
                                       small_unet)}


def make(name: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net, shape = ORACLE_NETS[name]()
    with torch.no_grad():
        randomize_batch_norms(net, generator)
    return net.eval(), shape
