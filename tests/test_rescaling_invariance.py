"""Path-norms are invariant under function-preserving neuron-wise rescaling (MATH.md section 2)."""
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import pathmonitor as pm
from nets import make
from random_nets import random_net

FACTORS = (1 / 4096, 1 / 128, 1.0, 128.0, 4096.0)


def _assert_same_function(a, b, shape):
    x = torch.randn((4,) + shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-9, atol=1e-9)


def _assert_same_norms(a, b, shape, qs=(1, 2, 3)):
    with torch.no_grad():
        for q in qs:
            assert float(pm.path_norm(b, shape, q)) == pytest.approx(float(pm.path_norm(a, shape, q)), rel=1e-9)
            assert float(pm.log_path_norm(b, shape, q)) == pytest.approx(float(pm.log_path_norm(a, shape, q)),
                                                                         rel=1e-9)


@pytest.mark.parametrize("name", ["conv_pool_chain", "one_dimensional", "small_unet", "unet_like"])
@pytest.mark.parametrize("seed", [0, 1])
def test_small_net_rescaling(name, seed):
    net, shape = make(name, seed)
    net = net.double()  # so that the rescaling itself is exact to float64 round-off
    rescaled = pm.random_rescale(net, factors=FACTORS, generator=torch.Generator().manual_seed(seed))
    moved = [not torch.allclose(a, b) for a, b in zip(net.parameters(), rescaled.parameters())]
    assert sum(moved) >= 2
    _assert_same_function(net, rescaled, shape)
    _assert_same_norms(net, rescaled, shape)


def test_resnet18_rescaling():
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval().double()
    rescaled = pm.random_rescale(net, factors=FACTORS, generator=torch.Generator().manual_seed(0))
    _assert_same_function(net, rescaled, (3, 64, 64))
    _assert_same_norms(net, rescaled, (3, 64, 64), qs=(1, 2))
    with torch.no_grad():
        assert float(pm.log_path_norm(rescaled, (3, 224, 224))) == pytest.approx(
            float(pm.log_path_norm(net, (3, 224, 224))), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 20))
def test_random_dags_rescaling(seed):
    net, shape = random_net(seed)
    net = net.double()
    rescaled = pm.random_rescale(net, factors=FACTORS, generator=torch.Generator().manual_seed(seed))
    _assert_same_function(net, rescaled, shape)
    _assert_same_norms(net, rescaled, shape)
    before = pm.path_magnitude_scores(net, shape, relative=True)
    after = pm.path_magnitude_scores(rescaled, shape, relative=True)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-7, atol=1e-300)
