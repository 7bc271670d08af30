"""Path-norms are invariant under function-preserving neuron-wise rescaling (MATH.md section 2)."""
import copy

import pytest
import torch
import torchvision

import pathmonitor as pm
from nets import make
from rescaling import rescale_pair


def _assert_same_function(a, b, shape):
    x = torch.randn((4,) + shape, dtype=torch.float64)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-9)


def _assert_same_norms(a, b, shape):
    with torch.no_grad():
        for q in (1, 2, 3):
            assert float(pm.path_norm(b, shape, q)) == pytest.approx(float(pm.path_norm(a, shape, q)), rel=1e-9)
            assert float(pm.log_path_norm(b, shape, q)) == pytest.approx(float(pm.log_path_norm(a, shape, q)),
                                                                         rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_net_rescaling(seed):
    net, shape = make("conv_pool_chain", seed)
    net = net.double()  # so that the rescaling itself is exact to float64 round-off
    rescaled = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    conv1, bn, conv2, linear1, linear2 = rescaled[0], rescaled[1], rescaled[4], rescaled[9], rescaled[11]
    rescale_pair(conv1, bn, g)  # conv neurons, compensated by the running statistics
    rescale_pair(bn, conv2, g)  # batch-norm neurons, through ReLU and a max-pool, into a grouped conv
    rescale_pair(conv2, linear1, g, block=6)  # through avg-pool, adaptive pool and flatten
    rescale_pair(linear1, linear2, g)
    assert not torch.allclose(net[0].weight, rescaled[0].weight)
    _assert_same_function(net, rescaled, shape)
    _assert_same_norms(net, rescaled, shape)


def test_resnet18_rescaling():
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval().double()
    rescaled = copy.deepcopy(net)
    g = torch.Generator().manual_seed(0)
    for layer in (rescaled.layer1, rescaled.layer2, rescaled.layer3, rescaled.layer4):
        for block in layer:
            rescale_pair(block.conv1, block.bn1, g)
            rescale_pair(block.bn1, block.conv2, g)
    shape = (3, 64, 64)
    _assert_same_function(net, rescaled, shape)
    with torch.no_grad():
        for q in (1, 2):
            assert float(pm.log_path_norm(rescaled, (3, 224, 224), q)) == pytest.approx(
                float(pm.log_path_norm(net, (3, 224, 224), q)), rel=1e-9)
            assert float(pm.path_norm(rescaled, shape, q)) == pytest.approx(float(pm.path_norm(net, shape, q)),
                                                                             rel=1e-9)
