"""Real model definitions from timm, segmentation-models-pytorch and MONAI, and the q = 1 oracle
that checks them by module surgery, sharing no code with the engine (MATH.md sections 1-2)."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ZooModel(NamedTuple):
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, **kwargs)
    return build


def _smp(architecture: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import segmentation_models_pytorch as smp
        return getattr(smp, architecture)("resnet18", encoder_weights=None, **kwargs)
    return build


def _monai(architecture: str, *args, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import monai.networks.nets as nets
        return getattr(nets, architecture)(*args, **kwargs)
    return build


IMAGE = (3, 64, 64)
RELU_NETWORKS = [
    ZooModel("timm/resnet18d", _timm("resnet18d"), IMAGE),  # deep stem, average-pool shortcuts
    ZooModel("timm/resnet26d", _timm("resnet26d"), IMAGE),
    ZooModel("timm/resnet10t", _timm("resnet10t"), IMAGE),
    ZooModel("timm/densenet121", _timm("densenet121"), IMAGE),
    ZooModel("timm/dla34", _timm("dla34"), IMAGE),
    ZooModel("timm/dpn68", _timm("dpn68"), IMAGE),
    ZooModel("timm/regnetx_002", _timm("regnetx_002"), IMAGE),
    ZooModel("timm/repvgg_a0", _timm("repvgg_a0"), IMAGE),
    ZooModel("timm/res2net50_14w_8s", _timm("res2net50_14w_8s"), IMAGE),
    ZooModel("timm/selecsls42b", _timm("selecsls42b"), IMAGE),
    ZooModel("timm/hrnet_w18_small", _timm("hrnet_w18_small"), IMAGE),
    ZooModel("timm/inception_v3", _timm("inception_v3"), (3, 96, 96)),
    ZooModel("timm/vgg11_bn", _timm("vgg11_bn", mlp_ratio=0.125), IMAGE),  # its head branches on the input size
    ZooModel("timm/vovnet39a", _timm("vovnet39a"), IMAGE),
    ZooModel("timm/xception41", _timm("xception41"), IMAGE),
    ZooModel("timm/gernet_s", _timm("gernet_s"), IMAGE),
    ZooModel("timm/mnasnet_100", _timm("mnasnet_100"), IMAGE),
    ZooModel("smp/Unet", _smp("Unet"), IMAGE),
    ZooModel("smp/UnetPlusPlus", _smp("UnetPlusPlus"), IMAGE),
    ZooModel("smp/Linknet", _smp("Linknet"), IMAGE),
    ZooModel("smp/PSPNet", _smp("PSPNet"), IMAGE),
    ZooModel("smp/DeepLabV3", _smp("DeepLabV3"), IMAGE),
    ZooModel("smp/DeepLabV3Plus", _smp("DeepLabV3Plus"), IMAGE),
    ZooModel("smp/Segformer", _smp("Segformer"), IMAGE),
    ZooModel("monai/UNet-2d", _monai("UNet", 2, 3, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2,
                                     act="RELU", norm="BATCH"), IMAGE),
    ZooModel("monai/UNet-3d", _monai("UNet", 3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
                                     act="RELU", norm="BATCH"), (1, 16, 16, 16)),
    ZooModel("monai/BasicUNet", _monai("BasicUNet", 2, 3, 2, features=(8, 8, 16, 32, 64, 8), act="relu",
                                       norm="batch"), IMAGE),
    ZooModel("monai/DynUNet", _monai("DynUNet", 2, 3, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                     upsample_kernel_size=[2, 2], act_name="relu", norm_name="batch"), IMAGE),
    ZooModel("monai/SegResNet", _monai("SegResNet", 2, 8, 3, 2, norm="BATCH", act="RELU"), IMAGE),
    ZooModel("monai/DenseNet121", _monai("DenseNet121", spatial_dims=2, in_channels=3, out_channels=2), IMAGE),
    ZooModel("monai/resnet18", _monai("resnet18", spatial_dims=2, n_input_channels=3, num_classes=2), IMAGE),
]

# (model, the kind of module or operation that must be among the reported problems)
NON_RELU_NETWORKS = [
    (ZooModel("timm/efficientnet_b0", _timm("efficientnet_b0"), IMAGE), "SiLU"),
    (ZooModel("timm/mobilenetv3_small_100", _timm("mobilenetv3_small_100"), IMAGE), "Hardswish"),
    (ZooModel("timm/rexnet_100", _timm("rexnet_100"), IMAGE), "ReLU6"),
    (ZooModel("timm/cspresnet50", _timm("cspresnet50"), IMAGE), "LeakyReLU"),
    (ZooModel("timm/seresnet18", _timm("seresnet18"), IMAGE), "Tensor.sigmoid"),
    (ZooModel("timm/skresnet18", _timm("skresnet18"), IMAGE), "torch.softmax"),
    (ZooModel("timm/resnet50_gn", _timm("resnet50_gn"), IMAGE), "GroupNorm"),
    (ZooModel("timm/convnext_atto", _timm("convnext_atto"), IMAGE), "LayerNorm2d"),
    (ZooModel("timm/vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=64), IMAGE), "LayerNorm"),
    (ZooModel("smp/MAnet", _smp("MAnet"), IMAGE), "Softmax"),
    (ZooModel("smp/PAN", _smp("PAN"), IMAGE), "Sigmoid"),
    (ZooModel("smp/FPN", _smp("FPN"), IMAGE), "GroupNorm"),
    (ZooModel("monai/AttentionUnet", _monai("AttentionUnet", 2, 3, 2, channels=(8, 16, 32), strides=(2, 2)),
              IMAGE), "Sigmoid"),
    (ZooModel("monai/UNet (PReLU, instance norm)", _monai("UNet", 2, 3, 2, channels=(8, 16), strides=(2,)),
              IMAGE), "PReLU"),
]


def _sum_pool(average: Callable) -> Callable:
    def pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        assert dilation in (1, (1, 1), (1, 1, 1), [1, 1], [1, 1, 1]) and not return_indices
        return average(input, kernel_size, stride or kernel_size, padding, ceil_mode=ceil_mode,
                       count_include_pad=True, divisor_override=1)
    return pool


@contextlib.contextmanager
def _summing_max_pools() -> Iterator[None]:
    """Max-pooling replaced by sum-pooling over the same windows (padding adds zeros), wherever it is
    called from: in the |theta| network every window entry is a path (MATH.md section 1)."""
    originals = F.max_pool2d, F.max_pool3d
    F.max_pool2d, F.max_pool3d = _sum_pool(F.avg_pool2d), _sum_pool(F.avg_pool3d)
    try:
        yield
    finally:
        F.max_pool2d, F.max_pool3d = originals


def l1_path_norm_by_surgery(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """||Phi(theta)||_1 by the classical surgery on a float64 copy: every weight and bias replaced by
    its magnitude, each batch-norm folded into the per-channel map |a| x + |c|, max-pools summing
    their windows; the sum of the outputs on an input of ones. Valid for models that add activations
    but never subtract them (a subtraction is a sum in the |theta| network)."""
    twin = copy.deepcopy(model).double().eval()
    covered = set()
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.affine and module.track_running_stats, module
                a = module.weight / torch.sqrt(module.running_var + module.eps)
                c = module.bias - module.running_mean * a
                module.weight.copy_(a.abs())
                module.bias.copy_(c.abs())
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.eps = 0.0
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                module.weight.abs_()
                if module.bias is not None:
                    module.bias.abs_()
            else:
                continue
            covered.update(id(p) for p in module.parameters(recurse=False))
        uncovered = [name for name, p in twin.named_parameters() if id(p) not in covered]
        assert not uncovered, f"the surgery does not know these parameters: {uncovered[:5]}"
        with _summing_max_pools():
            output = twin(torch.ones((1,) + tuple(input_shape), dtype=torch.float64))
    outputs = output if isinstance(output, (tuple, list)) else [output]
    return float(sum(o.sum() for o in outputs))
