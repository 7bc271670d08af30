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


INTERPOLATIONS = {
    "bilinear x2": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 4)),
    "bilinear x2 corners": (lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), (2, 3, 4)),
    "bilinear to 5x7": (lambda: nn.Upsample(size=(5, 7), mode="bilinear"), (2, 3, 4)),
    "bilinear down to 2x3": (lambda: nn.Upsample(size=(2, 3), mode="bilinear", align_corners=True), (2, 4, 5)),
    "bilinear x1.5": (lambda: nn.Upsample(scale_factor=1.5, mode="bilinear"), (2, 3, 4)),
    "bilinear x1.5 recomputed": (lambda: nn.Upsample(scale_factor=(1.5, 1.7), mode="bilinear",
                                                     recompute_scale_factor=True), (2, 3, 4)),
    "UpsamplingBilinear2d": (lambda: nn.UpsamplingBilinear2d(scale_factor=2), (2, 3, 3)),
    "functional, size from the shape": (lambda: Fn(lambda x: F.interpolate(
        x, size=(x.shape[-2] * 2 - 1, x.shape[-1] + 2), mode="bilinear", align_corners=True)), (2, 3, 4)),
    "functional, positional mode": (lambda: Fn(lambda x: F.interpolate(x, None, 2.0, "bilinear")), (2, 3, 3)),
    "linear": (lambda: nn.Upsample(scale_factor=3, mode="linear"), (2, 5)),
    "trilinear": (lambda: nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True), (2, 2, 2, 3)),
}


@pytest.mark.parametrize("name", sorted(INTERPOLATIONS))
def test_interpolation_edges_are_the_coefficients_raised_to_q(name):
    """Linear, bilinear and trilinear upsampling are fixed maps with non-negative coefficients: edges
    whose weights are the interpolation coefficients, raised to q in the |theta|^q network (MATH.md §1)."""
    make_upsample, shape = INTERPOLATIONS[name]
    torch.manual_seed(0)
    conv = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}[len(shape)]
    net = nn.Sequential(conv(shape[0], 3, 1), nn.ReLU(), make_upsample(), nn.ReLU(), conv(3, 2, 1))
    dag = neuron_dag(net, shape)
    for q in (1, 2, 3):
        with torch.no_grad():
            norm = float(pm.path_norm(net, shape, q=q))
        assert norm ** q == pytest.approx(path_sum(dag, q), rel=1e-9), f"{name} q={q}"


def test_the_separable_form_is_pytorchs_interpolation():
    """The axis-by-axis map at q = 1 is F.interpolate itself, for every setting the tests above use."""
    from pathmonitor.pools import Interpolation

    x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    for align_corners in (False, True):
        pool = Interpolation(2, align_corners)
        for options in ({"scale_factor": 2.0}, {"size": (7, 4)}, {"scale_factor": (1.5, 0.6)},
                        {"scale_factor": 1.7, "recompute_scale_factor": True}):
            direct = pool.magnitudes(x, 1.0, **options)
            assert torch.allclose(pool.separable(x, 1.0, **options), direct, rtol=1e-12, atol=1e-14), options


def test_interpolations_outside_the_path_model_are_refused_by_name():
    for layer, reason in ((lambda: nn.Upsample(scale_factor=2, mode="bicubic"), "negative coefficients"),
                          (lambda: nn.Upsample(scale_factor=2, mode="area"), "adaptive average pooling"),
                          (lambda: Fn(lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)),
                           "antialias")):
        net = nn.Sequential(nn.Conv2d(1, 2, 1), layer())
        with pytest.raises(pm.UnsupportedModelError, match=reason):
            pm.path_norm(net, (1, 4, 4))
