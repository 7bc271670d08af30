"""Differentiability, overflow handling, and leaving the model exactly as it was (MATH.md section 2)."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import pathmonitor as pm
from nets import make


def test_gradient_matches_finite_differences():
    net, shape = make("residual_concat", 0)
    net = net.double()
    params = dict(net.named_parameters())
    for q in (1, 2):
        value = pm.path_norm(net, shape, q)
        grads = torch.autograd.grad(value, list(params.values()))
        g = torch.Generator().manual_seed(q)
        for (name, p), grad in zip(params.items(), grads):
            for _ in range(2):
                i = int(torch.randint(p.numel(), (1,), generator=g))
                h = 1e-6 * max(1.0, abs(float(p.detach().view(-1)[i])))
                with torch.no_grad():
                    original = float(p.detach().view(-1)[i])
                    p.view(-1)[i] = original + h
                    up = float(pm.path_norm(net, shape, q))
                    p.view(-1)[i] = original - h
                    down = float(pm.path_norm(net, shape, q))
                    p.view(-1)[i] = original
                assert float(grad.view(-1)[i]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-7), name


def test_log_path_norm_gradient_is_the_gradient_of_the_log():
    net, shape = make("conv_pool_chain", 1)
    net = net.double()  # gradients come back in the parameters' dtype
    params = list(net.parameters())
    g_norm = torch.autograd.grad(pm.path_norm(net, shape, 2), params)
    norm = float(pm.path_norm(net, shape, 2).detach())
    g_log = torch.autograd.grad(pm.log_path_norm(net, shape, 2), params)
    for a, b in zip(g_norm, g_log):
        torch.testing.assert_close(b, a / norm, rtol=1e-9, atol=1e-15)


def test_no_graph_under_no_grad():
    net, shape = make("conv_pool_chain", 0)
    with torch.no_grad():
        assert pm.path_norm(net, shape).grad_fn is None
        assert not pm.log_path_norm(net, shape).requires_grad
    assert pm.path_norm(net, shape).requires_grad


def _chain(widths_and_values):
    layers = []
    for width, value in widths_and_values:
        linear = nn.Linear(width, width, bias=False)
        nn.init.constant_(linear.weight, value)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


def test_beyond_float64_log_is_exact_and_path_norm_warns_inf():
    n, depth, w = 8, 120, 100.0  # the sum over paths is n * (n*w)^depth, about 1e349
    net = _chain([(n, w)] * depth)
    expected_log = math.log(n) + depth * math.log(n * w)
    with torch.no_grad():
        assert float(pm.log_path_norm(net, (n,))) == pytest.approx(expected_log, rel=1e-12)
        assert float(pm.log_path_norm(net, (n,), q=2)) == pytest.approx(
            (math.log(n) + depth * math.log(n * w * w)) / 2, rel=1e-12)
        with pytest.warns(pm.PathNormOverflowWarning, match="log_path_norm"):
            assert math.isinf(float(pm.path_norm(net, (n,))))


def test_intermediate_overflow_still_gives_the_finite_value():
    n = 8  # activations reach 2^2160 half-way, the final sum n^121 is about 2e109
    net = _chain([(n, 2.0 ** 33)] * 60 + [(n, 2.0 ** -33)] * 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            value = float(pm.path_norm(net, (n,)))
    assert value == pytest.approx(float(n) ** 121, rel=1e-10)


def _snapshot(model):
    return (copy.deepcopy(model.state_dict()),
            [(name, m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for name, m in model.named_modules()],
            [(p.requires_grad, p.grad is None, p.dtype, p.device) for p in model.parameters()])


def _assert_unchanged(model, snapshot):
    state, modules, params = _snapshot(model)
    assert modules == snapshot[1] and params == snapshot[2]
    assert state.keys() == snapshot[0].keys()
    for key in state:
        assert torch.equal(state[key], snapshot[0][key]), key


@pytest.mark.parametrize("training", [True, False])
def test_model_is_left_exactly_as_it_was(training):
    net, shape = make("functional_ops", 0)
    net.train(training)
    net[1].eval()  # a mixed state must survive too
    calls = []
    net[0].register_forward_hook(lambda *a: calls.append("hook"))
    net[2].register_forward_pre_hook(lambda *a: calls.append("pre-hook"))
    before = _snapshot(net)
    with pytest.warns(pm.IgnoredHookWarning):  # hooks are not run: what they would do is not in the path model
        pm.path_norm(net, shape, q=2).backward()
    for p in net.parameters():
        p.grad = None
    with torch.no_grad():
        pm.log_path_norm(net, shape)
    pm.check_support(net, shape)
    with pytest.raises(pm.PathComputationError):
        pm.path_norm(net, (3, 6, 5))
    net.append(nn.GELU())
    with pytest.raises(pm.UnsupportedModelError):
        pm.path_norm(net, shape)
    del net[-1]
    _assert_unchanged(net, before)
    assert calls == []
