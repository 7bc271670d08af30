"""random_rescale preserves the function; the generalization bound's constants (MATH.md sections 4-5)."""
import math

import pytest
import torch
import torchvision
from torch import nn

import pathmonitor as pm
from nets import make


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "small_unet"])
def test_random_rescale_preserves_the_function_and_the_path_norm(name):
    if name == "small_unet":
        net, shape = make(name, 0)
    else:
        torch.manual_seed(0)
        net, shape = getattr(torchvision.models, name)().eval(), (3, 64, 64)
    rescaled = pm.random_rescale(net, generator=torch.Generator().manual_seed(0))
    x = torch.randn((2,) + shape)
    with torch.no_grad():
        torch.testing.assert_close(rescaled(x), net(x), rtol=1e-4, atol=1e-5 * float(net(x).abs().max()))
        ratios = [float((a.abs() / b.abs().clamp_min(1e-30)).max()) for a, b in
                  zip(rescaled.parameters(), net.parameters()) if a.dim() > 1]
        assert max(ratios) >= 128  # weights really moved
        assert float(pm.log_path_norm(rescaled, shape)) == pytest.approx(float(pm.log_path_norm(net, shape)),
                                                                         rel=1e-6)
    assert all(a is not b for a, b in zip(rescaled.parameters(), net.parameters()))


def test_random_rescale_rejects_bad_factors():
    with pytest.raises(ValueError, match="factors"):
        pm.random_rescale(nn.Linear(2, 2), factors=(1, -2))


def test_resnet18_constants_and_first_part():
    net = torchvision.models.resnet18()
    plain = pm.generalization_bound(net, (3, 224, 224), n_samples=1_268_355, input_bound=2.64)
    sharp = pm.generalization_bound(net, (3, 224, 224), n_samples=1_268_355, input_bound=2.64, sharpened=True)
    assert (plain.depth, plain.max_pool_kernel, plain.max_pool_kinds, plain.max_pools_per_path) == (18, 9, 1, 1)
    assert (plain.d_in, plain.d_out) == (3 * 224 * 224, 1000)
    assert f"{plain.first_part:.3g}" == "0.0881" and f"{sharp.first_part:.3g}" == "0.0599"
    with torch.no_grad():
        norm = float(pm.path_norm(net, (3, 224, 224)))
    assert plain.path_norm == pytest.approx(norm, rel=1e-9)
    assert plain.value == pytest.approx(norm * plain.first_part, rel=1e-9)
    doubled = pm.generalization_bound(net, (3, 224, 224), 1_268_355, 2.64, loss_lipschitz=2.0)
    assert doubled.value == pytest.approx(2 * plain.value, rel=1e-12)


def test_derived_constants_on_other_architectures():
    assert pm.generalization_bound(torchvision.models.resnet50(), (3, 64, 64), 10, 1.0).depth == 50
    heads, shape = make("two_heads", 0)
    bound = pm.generalization_bound(heads, shape, 100, 1.0)
    assert (bound.depth, bound.max_pool_kernel, bound.max_pool_kinds, bound.d_out) == (3, 1, 0, 3)
    c = math.sqrt(3 * math.log(3) + math.log(3 * 6 * 3))
    assert bound.first_part == pytest.approx(4 * c * 1.0 / 10, rel=1e-12)
    uneven = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveMaxPool2d((2, 3)), nn.MaxPool2d(2, ceil_mode=True),
                           nn.Flatten(), nn.Linear(4, 2))
    bound = pm.generalization_bound(uneven, (1, 9, 9), 100, 1.0)  # 7x7 into 2x3: windows up to 4x3
    assert (bound.max_pool_kernel, bound.max_pools_per_path, bound.depth) == (12, 2, 2)
    overridden = pm.generalization_bound(uneven, (1, 9, 9), 100, 1.0, depth=5, max_pool_kernel=3, d_out=7)
    assert (overridden.depth, overridden.max_pool_kernel, overridden.d_out) == (5, 3, 7)


@pytest.mark.parametrize("kwargs", [{"n_samples": 0}, {"n_samples": 2.5}, {"input_bound": -1.0},
                                    {"loss_lipschitz": float("nan")}])
def test_bound_rejects_bad_arguments(kwargs):
    arguments = {"n_samples": 10, "input_bound": 1.0, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        pm.generalization_bound(nn.Linear(3, 2), (3,), **arguments)


def test_random_rescale_of_pruned_and_parametrized_modules():
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = net(x)  # the forward also makes the pruned model copyable
    rescaled = pm.random_rescale(net, factors=(128.0,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rescaled[0].weight, rescaled[0].weight_orig * rescaled[0].weight_mask)
        torch.testing.assert_close(rescaled(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(rescaled[0].weight_orig, net[0].weight_orig)
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="'0'.*parametrized"):
        pm.random_rescale(normed)


@pytest.mark.parametrize("override", [{"depth": -3}, {"max_pool_kernel": 0}, {"d_out": 0}, {"max_pool_kinds": -1},
                                      {"depth": 2.5}])
def test_bound_rejects_bad_overrides(override):
    with pytest.raises(ValueError, match=next(iter(override))):
        pm.generalization_bound(nn.Linear(3, 2), (3,), 10, 1.0, **override)


def test_bound_accepts_numpy_integers_and_treats_small_input_bounds_as_one():
    import numpy as np

    model = nn.Linear(3, 2)
    small = pm.generalization_bound(model, (3,), np.int64(100), 0.5)
    assert small.first_part == pm.generalization_bound(model, (3,), 100, 1.0).first_part


def test_random_rescale_never_pools_across_linear_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.MaxPool1d(3, 1, 1), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    rescaled = pm.random_rescale(net, factors=(4096.0,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rescaled(x), net(x))
    assert pm.rescale.rescalable_pairs(pm.rescale.topology(net), net) == []


def _three_layers(tie: str) -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).double()
    if tie == "weight":
        net[4].weight = net[0].weight
    elif tie == "bias":
        net[4].bias = net[0].bias
    return net


@pytest.mark.parametrize("tie", ["weight", "bias"])
def test_rescaling_leaves_layers_with_tied_tensors_alone(tie):
    """Scaling a tensor another layer holds too would scale that layer as well: the function changed by 441."""
    torch.manual_seed(0)
    net = _three_layers(tie)
    rescaled = pm.random_rescale(net, generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, 4, dtype=torch.float64)
    torch.testing.assert_close(rescaled(x), net(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reparametrize", [torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm])
def test_rescaling_refuses_weights_a_hook_recomputes(reparametrize):
    net = _three_layers("")
    reparametrize(net[2])
    with torch.no_grad():  # a weight computed without autograd: the model can then be copied
        net(torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="recomputes at every forward"):
        pm.random_rescale(net)


class _PooledAcrossChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):  # a 3-d pool of a 4-d tensor: unbatched, its window spans the channels
        return self.b(torch.nn.functional.max_pool3d(self.a(x), (3, 1, 1), 1, (1, 0, 0)))


def test_rescaling_leaves_channels_a_pool_mixes_alone():
    torch.manual_seed(0)
    net = _PooledAcrossChannels().double()
    rescaled = pm.random_rescale(net, generator=torch.Generator().manual_seed(0), input_shape=(2, 6, 6))
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(rescaled(x), net(x), rtol=1e-12, atol=1e-12)
