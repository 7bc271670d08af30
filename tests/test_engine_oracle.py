"""The engine against the explicit-DAG oracle, for every supported op (MATH.md sections 1-2)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import pathmonitor as pm
from nets import ORACLE_NETS, make
from oracle import Fn, enumerated_path_sum, neuron_dag, path_sum
from random_nets import random_net


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(ORACLE_NETS))
def test_engine_matches_explicit_path_sums(name, seed):
    net, shape = make(name, seed)
    dag = neuron_dag(net, shape)
    for q in (1, 2, 3):
        expected = path_sum(dag, q)
        with torch.no_grad():
            norm = pm.path_norm(net, shape, q=q)
            log_norm = pm.log_path_norm(net, shape, q=q)
        assert norm.dtype == torch.float64 and norm.dim() == 0
        assert float(norm) ** q == pytest.approx(expected, rel=1e-9), f"{name} q={q}"
        assert q * float(log_norm) == pytest.approx(math.log(expected), rel=1e-9, abs=1e-12), f"{name} q={q}"


def test_dynamic_programming_oracle_equals_literal_path_enumeration():
    net, shape = make("tiny_residual", 3)
    dag = neuron_dag(net, shape)
    for q in (1, 2, 3):
        assert enumerated_path_sum(dag, q) == pytest.approx(path_sum(dag, q), rel=1e-12)
        engine = float(pm.path_norm(net, shape, q=q).detach()) ** q
        assert engine == pytest.approx(enumerated_path_sum(dag, q), rel=1e-9)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_count_each_kernel_entry_as_its_own_edge(mode):
    torch.manual_seed(0)
    built_in = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.ReLU(), nn.Conv2d(3, 1, 2))
    explicit = nn.Sequential(Fn(lambda x: F.pad(x, (1, 1, 1, 1), mode=mode)), nn.Conv2d(2, 3, 3), nn.ReLU(),
                             nn.Conv2d(3, 1, 2))
    explicit.load_state_dict({k.replace("0.", "1.", 1) if k.startswith("0.") else k.replace("2.", "3.", 1): v
                              for k, v in built_in.state_dict().items()})
    expected = path_sum(neuron_dag(explicit, (2, 4, 5)), 2)
    assert float(pm.path_norm(built_in, (2, 4, 5), q=2).detach()) ** 2 == pytest.approx(expected, rel=1e-9)


def test_value_depends_on_input_resolution():
    net, _ = make("conv_pool_chain", 0)
    with torch.no_grad():
        assert float(pm.path_norm(net, (2, 9, 11))) != pytest.approx(float(pm.path_norm(net, (2, 12, 12))), rel=1e-3)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 20))
def test_random_dags_match_the_oracle(seed):
    """Random compositions of every supported layer, residual adds, subtractions and concatenations,
    with random strides, paddings, dilations, groups, ceil modes and divisors."""
    net, shape = random_net(seed)
    dag = neuron_dag(net, shape)
    with torch.no_grad():
        for q in (1, 2, 3):
            expected = path_sum(dag, q)
            assert float(pm.path_norm(net, shape, q=q)) ** q == pytest.approx(expected, rel=1e-9), (q, net)
            assert q * float(pm.log_path_norm(net, shape, q=q)) == pytest.approx(math.log(expected), rel=1e-9,
                                                                                 abs=1e-12), (q, net)


class DictNet(nn.Module):
    """Blocks held in a ModuleDict inside a nested Sequential, called in a loop."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"conv": nn.Conv2d(2, 4, 3, padding=1), "norm": nn.BatchNorm2d(4),
                                     "act": nn.ReLU()})
        self.head = nn.Sequential(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()), nn.Linear(16, 3))

    def forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return self.head(x)


def test_module_dict_and_nested_sequential():
    torch.manual_seed(0)
    net = DictNet().eval()
    twin = nn.Sequential(*net.blocks.values(), *net.head[0], net.head[1])
    with torch.no_grad():
        for q in (1, 2):
            assert float(pm.path_norm(net, (2, 5, 5), q)) ** q == pytest.approx(
                path_sum(neuron_dag(twin, (2, 5, 5)), q), rel=1e-9)


def test_reindexing_and_padding_modules():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ChannelShuffle(2), nn.ZeroPad2d((1, 0, 2, 1)), nn.ReLU(),
        nn.PixelShuffle(2), nn.ConstantPad2d((1, 1, 0, 0), 0.0), nn.Conv2d(1, 4, 2, stride=2), nn.PixelUnshuffle(2),
        Fn(lambda x: F.pad(x, (0, 1), value=0.0)), nn.Flatten(), nn.Unflatten(1, (4, -1)), nn.Flatten(),
        nn.LazyLinear(2),
    )
    with torch.no_grad():
        net(torch.zeros(1, 2, 5, 6))  # initializes the lazy layer
    dag = neuron_dag(net, (2, 5, 6))
    with torch.no_grad():
        for q in (1, 3):
            assert float(pm.path_norm(net, (2, 5, 6), q)) ** q == pytest.approx(path_sum(dag, q), rel=1e-9)
