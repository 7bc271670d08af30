"""torchvision's real model definitions as the architecture corpus (MATH.md sections 1-2)."""
import math

import pytest
import torch
import torchvision

import pathmonitor as pm

SUPPORTED = ["resnet18", "resnet50", "vgg11_bn", "alexnet", "squeezenet1_0", "densenet121",
             "shufflenet_v2_x0_5", "googlenet"]


def _model(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(**kwargs)


@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_architectures_give_finite_consistent_values(name):
    model = _model(name)
    assert not pm.check_support(model, (3, 224, 224))
    with torch.no_grad():
        for q in (1, 2):
            norm = pm.path_norm(model, (3, 224, 224), q)
            log_norm = pm.log_path_norm(model, (3, 224, 224), q)
            assert math.isfinite(float(log_norm))
            assert math.isfinite(float(norm)) and float(norm) > 0
            assert float(log_norm) == pytest.approx(math.log(float(norm)), abs=1e-12 * max(1.0, abs(float(log_norm))))


@pytest.mark.parametrize("name, module_type, example", [("mobilenet_v2", "ReLU6", "features.0.2"),
                                                         ("efficientnet_b0", "SiLU", "features.0.2")])
def test_unsupported_architectures_name_every_offending_module(name, module_type, example):
    model = getattr(torchvision.models, name)()
    offending = {n for n, m in model.named_modules() if type(m).__name__ == module_type}
    with pytest.raises(pm.UnsupportedModelError) as raised:
        pm.path_norm(model, (3, 224, 224))
    reported = {p.name for p in raised.value.problems if p.kind == module_type}
    assert reported == offending and example in reported
    assert f"{example} ({module_type})" in str(raised.value)
    assert set(pm.check_support(model, (3, 224, 224))) == set(raised.value.problems)
