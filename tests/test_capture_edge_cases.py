"""Edge cases of capture and evaluation: tensor attributes, keyword arguments, cache invalidation,
tiny and huge magnitudes, tensor literals in forward, pruned modules, wrappers."""
import copy
import math

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401  (makes torch.nn.utils.prune available)
import torch.nn.functional as F
from torch import nn

import pathmonitor as pm
from oracle import Fn, neuron_dag, path_sum


def _mlp(*middle):
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), *middle, nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)).double()


def _oracle(net, shape, q=1):
    return path_sum(neuron_dag(net, shape), q)


def test_transpose_attributes_reindex_and_other_attributes_are_rejected():
    torch.manual_seed(0)
    net = _mlp(Fn(lambda x: x.mT.mT), Fn(lambda x: x.T.T))
    plain = nn.Sequential(*[m for m in net if not isinstance(m, Fn)])
    assert float(pm.path_norm(net, (4,)).detach()) == pytest.approx(_oracle(plain, (4,)), rel=1e-9)
    with pytest.raises(pm.UnsupportedModelError, match="'data'"):
        pm.path_norm(_mlp(Fn(lambda x: x.data)), (4,))


@pytest.mark.parametrize("step", [
    lambda x: torch.mul(x, other=2.0), lambda x: torch.add(x, other=x),
    lambda x: x.sum(1, keepdim=True, dtype=torch.float32).expand(-1, 4),
    lambda x: x.mean(dim=None, keepdim=True).expand(-1, 4) * 4,
    lambda x: F.relu(input=x),
    lambda x: F.adaptive_max_pool1d(input=x.unsqueeze(1), output_size=2).flatten(1).repeat(1, 2),
])
def test_keyword_arguments(step):
    torch.manual_seed(0)
    head = nn.Linear(4, 4).double()
    net = nn.Sequential(head, Fn(step), nn.Linear(4, 1).double())
    value = float(pm.path_norm(net, (4,)).detach())
    assert value == pytest.approx(_oracle(net, (4,)), rel=1e-9)


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(input=x)


def test_module_called_with_a_keyword_input():
    model = KeywordCall()
    expected = float(model.fc.weight.detach().double().abs().sum() + model.fc.bias.detach().double().abs().sum())
    assert float(pm.path_norm(model, (4,)).detach()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step, message", [
    (lambda x: torch.div(x, 2, rounding_mode="floor"), "rounds"),
    (lambda x: x.to(torch.int64).to(torch.float64), "non-floating"),
    (lambda x: x * torch.tensor(2.0, dtype=torch.float64), "tensor"),
])
def test_rounding_and_tensor_literals_are_rejected_without_touching_the_model(step, message):
    net = _mlp(Fn(step))
    attributes = set(vars(net)) | {k for m in net.modules() for k in vars(m)}
    with pytest.raises(pm.UnsupportedModelError, match=message):
        pm.path_norm(net, (4,))
    assert set(vars(net)) | {k for m in net.modules() for k in vars(m)} == attributes


class LiteralIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return F.relu(self.fc(x))[:, torch.tensor([0, 2])]


def test_tensor_literals_in_forward_work_and_stay_out_of_the_model():
    model = LiteralIndex()
    before = set(vars(model))
    value = float(pm.path_norm(model, (3,)).detach())
    rows = [0, 2]
    expected = float(model.fc.weight[rows].detach().double().abs().sum() + model.fc.bias[rows].detach().double().abs().sum())
    assert value == pytest.approx(expected, rel=1e-9)
    assert set(vars(model)) == before


class Switch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.use_b = False

    def forward(self, x):
        return self.b(x) if self.use_b else self.a(x)


def test_cache_follows_module_settings_and_forward_flags():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 1))
    pm.path_norm(net, (1, 4, 4))
    net[2].kernel_size, net[2].padding = 3, 1
    fresh = copy.deepcopy(net)
    assert float(pm.path_norm(net, (1, 4, 4)).detach()) == float(pm.path_norm(fresh, (1, 4, 4)).detach())
    switch = Switch()
    first = float(pm.path_norm(switch, (2,)).detach())
    switch.use_b = True
    second = float(pm.path_norm(switch, (2,)).detach())
    expected = float(switch.b.weight.detach().double().abs().sum() + switch.b.bias.detach().double().abs().sum())
    assert second == pytest.approx(expected) and first != pytest.approx(second)


def test_subnormal_and_tiny_magnitudes():
    tiny = nn.Linear(1, 1, bias=False).double()
    tiny.weight.data.fill_(1e-310)
    assert float(pm.log_path_norm(tiny, (1,)).detach()) == pytest.approx(math.log(1e-310), rel=1e-9)
    biased = nn.Linear(1, 1).double()
    biased.weight.data.fill_(1e-310)
    biased.bias.data.fill_(1e-315)
    assert float(pm.log_path_norm(biased, (1,)).detach()) == pytest.approx(math.log(1e-310 + 1e-315), rel=1e-6)
    chain = nn.Sequential(*[nn.Linear(1, 1, bias=False).double() for _ in range(10)])
    for layer in chain:
        layer.weight.data.fill_(1e-20)
    assert float(pm.path_norm(chain, (1,), q=2).detach()) == pytest.approx(1e-200, rel=1e-9)


def test_huge_constant_factor_and_huge_q():
    net = nn.Sequential(nn.Linear(2, 2).double(), Fn(lambda x: x * 1e200), nn.Linear(2, 1).double())
    reference = nn.Sequential(copy.deepcopy(net[0]), copy.deepcopy(net[2]))
    through_scale = _oracle(reference, (2,), 2) - float(net[2].bias.detach().pow(2).sum())
    expected = 0.5 * (math.log(through_scale) + 400 * math.log(10))  # the last bias's paths are negligible
    assert float(pm.log_path_norm(net, (2,), q=2).detach()) == pytest.approx(expected, rel=1e-6)
    assert float(pm.path_norm(net, (2,), q=2).detach()) == pytest.approx(math.exp(expected), rel=1e-6)
    huge = nn.Linear(3, 1, bias=False).double()
    huge.weight.data.fill_(2.0)
    with pytest.raises(pm.PathComputationError, match="smaller q"):
        pm.log_path_norm(huge, (3,), q=1100)


def test_pruned_modules_use_their_current_mask_and_original():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.5)
    with torch.no_grad():
        net[0].weight_orig.mul_(2)  # no forward since: net[0].weight is stale
    reference = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        reference[0].weight.copy_(net[0].weight_orig * net[0].weight_mask)
        reference[0].bias.copy_(net[0].bias)
        reference[2].load_state_dict(net[2].state_dict())
    assert float(pm.path_norm(net, (4,)).detach()) == pytest.approx(float(pm.path_norm(reference, (4,)).detach()))


def test_wrappers_are_unwrapped():
    net = _mlp()
    expected = float(pm.path_norm(net, (4,)).detach())
    assert float(pm.path_norm(nn.DataParallel(net), (4,)).detach()) == expected
    assert float(pm.path_norm(torch.compile(net), (4,)).detach()) == expected
