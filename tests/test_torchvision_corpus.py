"""torchvision's real model definitions as the architecture corpus (MATH.md sections 1-2)."""
import copy
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


@pytest.mark.parametrize("name", SUPPORTED)
def test_a_rebuilt_model_or_a_float64_copy_is_the_same_architecture(name):
    """What a path-metric between two checkpoints of one model compares: a second build and a float64 copy
    trace to the same architecture, and the state dict of either is accepted."""
    from pathmonitor.architecture import check_same, check_state_dict_keys
    from pathmonitor.graph import capture

    model, rebuilt = _model(name).eval(), _model(name).eval()
    for other in (rebuilt, copy.deepcopy(model).double()):
        check_same(capture(model, (3, 64, 64)).architecture, capture(other, (3, 64, 64)).architecture)
        check_state_dict_keys(model, other.state_dict())


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
