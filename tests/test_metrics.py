"""Path-metrics and the function-distance theorem (MATH.md section 3)."""
import copy
import math
import re

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401  (makes torch.nn.utils.prune available)
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import pathmonitor as pm
from nets import ORACLE_NETS, make
from oracle import enumerated_path_metric, neuron_dag, path_sum
from random_nets import random_net
from perturb import AFFINE, perturbed

TINY = ["tiny_residual", "tiny_conv", "two_heads"]


def _outputs(net, x):
    out = net(x)
    if isinstance(out, tuple):
        first, rest = out
        return torch.cat([first.flatten(1)] + [v.flatten(1) for v in rest.values()], dim=1)
    return out.flatten(1)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruning_is_exact_against_path_enumeration(name, seed):
    net, shape = make(name, seed)
    pruned = perturbed(net, "pruning", torch.Generator().manual_seed(seed))
    truth = enumerated_path_metric(neuron_dag([net, pruned], shape))
    for first, second in ((net, pruned), (pruned, net)):
        metric = pm.path_metric(first, second, shape)
        assert metric.kind == "pruning" and metric.exact
        assert metric.value == pytest.approx(truth, rel=1e-9)
    assert pm.path_metric(net, pruned.state_dict(), shape).value == pytest.approx(truth, rel=1e-9)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("kind", ["same_sign", "general"])
def test_bounds_dominate_the_true_path_metric(name, kind):
    net, shape = make(name, 3)
    other = perturbed(net, kind, torch.Generator().manual_seed(4))
    truth = enumerated_path_metric(neuron_dag([net, other], shape))
    metric = pm.path_metric(net, other, shape)
    assert metric.kind == kind and not metric.exact
    assert metric.value >= truth * (1 - 1e-12)
    assert metric.relative == pytest.approx(metric.value / float(pm.path_norm(net, shape).detach()), rel=1e-9)



def _folded(module):
    """Signed (edge weights, biases) in float64; a batch-norm folded by hand: a = gamma/sqrt(var+eps),
    c = beta - mean*a."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        a = module.weight.double() / torch.sqrt(module.running_var.double() + module.eps)
        return a, module.bias.double() - module.running_mean.double() * a
    return module.weight.double(), None if module.bias is None else module.bias.double()


def _surgery(first, second, combine):
    """A float64 copy of `first` whose every affine module holds combine(x, y) of the two networks' edges
    (a batch-norm then has zero mean and unit variance, so that its folded edges are exactly those)."""
    built = copy.deepcopy(first).double()
    with torch.no_grad():
        for (name, target), m_first, m_second in zip(built.named_modules(), first.modules(), second.modules()):
            if not isinstance(target, AFFINE):
                continue
            edges = [None if x is None else combine(x, y) for x, y in zip(_folded(m_first), _folded(m_second))]
            if isinstance(target, nn.modules.batchnorm._BatchNorm):
                target.running_mean.zero_()
                target.running_var.fill_(1 - target.eps)
            for p, value in zip((target.weight, target.bias), edges):
                if p is not None:
                    p.copy_(value)
    return built


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("kind", ["same_sign", "general"])
def test_bounds_equal_their_formulas_on_networks_built_by_surgery(name, kind):
    """same_sign: ||Phi(max(|a|,|b|))||_1 - ||Phi(min(|a|,|b|))||_1; general: the same through the sign split a''
    (a's coordinates of sign opposite to b's set to 0), plus ||Phi(a)||_1 - ||Phi(a'')||_1 (MATH.md §3)."""
    net, shape = make(name, 5)
    other = perturbed(net, kind, torch.Generator().manual_seed(6))
    norm = lambda network: float(pm.path_norm(network, shape).detach())  # noqa: E731
    first, expected = net, 0.0
    if kind == "general":
        split = lambda x, y: torch.where(x.sign() * y.sign() < 0, torch.zeros_like(x), x)  # noqa: E731
        first = _surgery(net, other, split)
        expected = norm(net) - norm(first)
    upper = _surgery(first, other, lambda x, y: torch.maximum(x.abs(), y.abs()))
    lower = _surgery(first, other, lambda x, y: torch.minimum(x.abs(), y.abs()))
    expected += norm(upper) - norm(lower)
    metric = pm.path_metric(net, other, shape)
    assert metric.kind == kind and norm(upper) > norm(lower) > 0
    assert metric.value == pytest.approx(expected, rel=1e-12, abs=1e-12 * norm(upper))

@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(ORACLE_NETS)), kind=st.sampled_from(["pruning", "same_sign", "general"]),
       seed=st.integers(0, 2 ** 16), log_scale=st.floats(-2, 3))
def test_function_distance_theorem(name, kind, seed, log_scale):
    net, shape = make(name, seed % 7)
    net = net.double()
    g = torch.Generator().manual_seed(seed)
    other = perturbed(net, kind, g)
    metric = pm.path_metric(net, other, shape)
    x = torch.randn((8,) + shape, generator=g, dtype=torch.float64) * 10 ** log_scale
    with torch.no_grad():
        distance = (_outputs(net, x) - _outputs(other, x)).abs().sum(dim=1)
    radius = x.flatten(1).abs().amax(dim=1).clamp_min(1.0)
    assert bool((distance <= radius * metric.value * (1 + 1e-9) + 1e-12).all()), (distance / radius).max()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 20), kind=st.sampled_from(["pruning", "same_sign", "general"]),
       log_scale=st.floats(-2, 3))
def test_theorem_and_pruning_exactness_on_random_dags(seed, kind, log_scale):
    net, shape = random_net(seed)
    net = net.double()
    g = torch.Generator().manual_seed(seed)
    other = perturbed(net, kind, g)
    metric = pm.path_metric(net, other, shape)
    if kind == "pruning":  # sum_p |Phi_p(a)| - |Phi_p(b)|, every term non-negative, by the oracle
        dag = neuron_dag([net, other], shape)
        assert metric.exact and metric.value == pytest.approx(path_sum(dag, 1, 0) - path_sum(dag, 1, 1),
                                                              rel=1e-7, abs=1e-12 * path_sum(dag, 1, 0))
    x = torch.randn((8,) + shape, generator=g, dtype=torch.float64) * 10 ** log_scale
    with torch.no_grad():
        distance = (_outputs(net, x) - _outputs(other, x)).abs().sum(dim=1)
    radius = x.flatten(1).abs().amax(dim=1).clamp_min(1.0)
    assert bool((distance <= radius * metric.value * (1 + 1e-9) + 1e-12).all())


def test_sign_split_is_needed():
    """v * ReLU(u * x): (u, v) = (1, 1) and (-1, -1) have the same Phi but different functions."""
    def net(sign):
        model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False))
        with torch.no_grad():
            model[0].weight.fill_(sign)
            model[2].weight.fill_(sign)
        return model

    a, b = net(1.0), net(-1.0)
    with torch.no_grad():
        assert float(pm.path_norm(a, (1,))) == float(pm.path_norm(b, (1,))) == 1.0  # Phi(a) = Phi(b) = (1,)
    x = torch.tensor([[1.0], [-1.0]])
    with torch.no_grad():
        distance = (a(x) - b(x)).abs().sum(dim=1)  # 1 at x = 1 and at x = -1
    metric = pm.path_metric(a, b, (1,))
    assert metric.kind == "general" and not metric.exact
    assert bool((distance <= metric.value).all()) and metric.value == pytest.approx(2.0)


def test_function_distance_bound_scales_with_the_input_norm():
    net, shape = make("tiny_conv", 0)
    pruned = perturbed(net, "pruning", torch.Generator().manual_seed(0))
    value = pm.path_metric(net, pruned, shape).value
    assert pm.function_distance_bound(net, pruned, shape, 0.5) == pytest.approx(value)
    assert pm.function_distance_bound(net, pruned, shape, 3.0) == pytest.approx(3 * value)
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="input_inf_norm"):
            pm.function_distance_bound(net, pruned, shape, bad)


def test_identical_networks_are_at_distance_zero_and_mismatches_are_named():
    net, shape = make("tiny_conv", 0)
    metric = pm.path_metric(net, copy.deepcopy(net), shape)
    assert metric.value == 0 and metric.exact and metric.log_value == -math.inf
    wider = copy.deepcopy(net)
    wider[6] = nn.Linear(18, 3)
    with pytest.raises(ValueError, match="'6'"):
        pm.path_metric(net, wider, shape)
    state = net.state_dict()
    del state["6.weight"]
    with pytest.raises(ValueError, match="6.weight"):
        pm.path_metric(net, state, shape)
    with pytest.raises(TypeError, match="state dict"):
        pm.path_metric(net, 3, shape)


def test_deep_networks_do_not_overflow():
    depth, n = 120, 8
    layers = []
    for _ in range(depth):
        linear = nn.Linear(n, n, bias=False)
        nn.init.constant_(linear.weight, 100.0)
        layers += [linear, nn.ReLU()]
    net = nn.Sequential(*layers)
    pruned = copy.deepcopy(net)
    with torch.no_grad():
        pruned[0].weight[:, : n // 2] = 0  # half of the paths removed
    metric = pm.path_metric(net, pruned, (n,))
    expected_log = math.log(n) + depth * math.log(n * 100.0) + math.log(0.5)
    assert metric.exact and metric.value == math.inf
    assert metric.log_value == pytest.approx(expected_log, rel=1e-12)
    assert metric.relative == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("quantizer", ["bf16", "fp16", "int8", lambda t: torch.round(t * 64) / 64])
@pytest.mark.parametrize("name", TINY)
def test_quantization_bound_dominates_and_certifies(quantizer, name):
    net, shape = make(name, 5)
    quantize = pm.metrics.QUANTIZERS[quantizer] if isinstance(quantizer, str) else (lambda t, module: quantizer(t))
    quantized = copy.deepcopy(net)
    with torch.no_grad():
        for module in quantized.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.BatchNorm2d)):
                for p in (module.weight, module.bias):
                    if p is not None:
                        p.copy_(quantize(p, module))
    truth = enumerated_path_metric(neuron_dag([net, quantized], shape))
    bound = pm.quantization_bound(net, quantizer, shape)
    assert bound.value >= truth * (1 - 1e-12) and truth > 0
    x = torch.randn((16,) + shape, dtype=torch.float64) * 5
    with torch.no_grad():
        moved = (_outputs(net.double(), x) - _outputs(quantized.double(), x)).abs().sum(dim=1)
    assert bool((moved <= x.flatten(1).abs().amax(dim=1).clamp_min(1) * bound.value * (1 + 1e-9)).all())


def test_unknown_quantizer():
    with pytest.raises(ValueError, match="unknown quantizer"):
        pm.quantization_bound(nn.Linear(2, 2), "int3", (2,))


def _nonnegative(net):
    """|theta| for every weight and bias; batch-norms centred so that a > 0 and c > 0."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
            for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(p, torch.Tensor):
                    p.abs_()
    return net


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_bound_is_attained_on_nonnegative_networks(seed):
    """Without max-pools, a network with non-negative parameters is linear on non-negative inputs and
    R(1) sums exactly Phi over all paths, so the certified bound is reached at x = ones: the path-metric
    cannot be an over-estimate there."""
    torch.manual_seed(seed)
    net = _nonnegative(nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(3, 4, 2), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(), nn.Linear(8, 3))).double().eval()
    pruned = perturbed(net, "pruning", torch.Generator().manual_seed(seed))
    shape = (2, 7, 5)
    metric = pm.path_metric(net, pruned, shape)
    ones = torch.ones((1,) + shape, dtype=torch.float64)
    with torch.no_grad():
        moved = float((net(ones) - pruned(ones)).abs().sum())
    assert metric.exact and moved == pytest.approx(metric.value, rel=1e-9)


def test_int8_scales_transposed_convolutions_per_output_channel():
    layer = nn.ConvTranspose2d(4, 6, 2, groups=2)
    with torch.no_grad():
        layer.weight[:, 1] *= 1e-3  # output channels 1 and 4 are a thousand times smaller
    quantized = pm.metrics.QUANTIZERS["int8"](layer.weight, layer)
    grouped = layer.weight.detach().reshape(2, 2, 3, -1)
    error = (quantized.reshape(2, 2, 3, -1) - grouped).abs().amax(dim=(1, 3))
    scale = grouped.abs().amax(dim=(1, 3)) / 127
    assert bool((error <= scale / 2 * (1 + 1e-6)).all())
    assert bool((quantized[:, 1] != 0).all())


def test_mixed_precision_pairs_are_compared_without_rounding():
    torch.manual_seed(0)
    master = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        for p in master.parameters():
            p.add_(torch.randn_like(p) * 1e-6)  # values that float32 cannot hold exactly
    model = copy.deepcopy(master).float()
    truth = enumerated_path_metric(neuron_dag([copy.deepcopy(model).double(), master], (3,)))
    metric = pm.path_metric(model, master.state_dict(), (3,))
    assert metric.value >= truth * (1 - 1e-9) and truth > 0
    if metric.exact:
        assert metric.value == pytest.approx(truth, rel=1e-6)


def test_a_pair_that_shrinks_one_tensor_and_grows_another_is_not_exact():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight.mul_(0.5)
        b[2].bias.mul_(3.0)
    truth = enumerated_path_metric(neuron_dag([a, b], (2,)))
    for first, second in ((a, b), (b, a)):
        metric = pm.path_metric(first, second, (2,))
        assert metric.kind == "same_sign" and not metric.exact and metric.value >= truth * (1 - 1e-12)


def test_tiny_opposite_weights_are_a_sign_conflict():
    a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        a.weight.fill_(1e-25)
        b.weight.fill_(-1e-25)
    metric = pm.path_metric(a, b, (1,))
    assert metric.kind == "general" and metric.value == pytest.approx(2e-25, rel=1e-6)


def test_another_architecture_with_the_same_shapes_is_refused():
    """Same tensor shapes, another function: a stride, a pooling chosen in forward, a layer more; a state
    dict with entries the model lacks. The path-metric compares two weight vectors of ONE network."""
    class Net(nn.Module):
        def __init__(self, stride=1, pool="max"):
            super().__init__()
            self.pool = pool
            self.body = nn.Sequential(nn.Conv2d(1, 3, 3, stride=stride), nn.ReLU())
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = self.body(x)
            h = F.adaptive_max_pool2d(h, 1) if self.pool == "max" else F.adaptive_avg_pool2d(h, 1)
            return self.head(h.flatten(1))

    net = Net().eval()
    for other, named in ((Net(stride=2), "layer 'body.0' (Conv2d): stride (1, 1) in the model, (2, 2)"),
                         (Net(pool="mean"), "adaptive_avg_pool2d"), (Net(), "calls")):
        other.load_state_dict(net.state_dict())
        if named == "calls":
            other.body.append(nn.Identity())
        with pytest.raises(pm.ParameterMismatchError, match=re.escape(named)):
            pm.path_metric(net, other.eval(), (1, 7, 7))
    assert pm.path_metric(net, Net().eval(), (1, 7, 7)).kind  # separately built, same architecture: compared
    extra = {**net.state_dict(), "tail.weight": torch.zeros(2, 2)}
    with pytest.raises(pm.ParameterMismatchError, match="'tail.weight'.*another architecture"):
        pm.path_metric(net, extra, (1, 7, 7))


class _Block(nn.Module):
    """conv, ReLU, and a head reading ReLU(z) + z: with an in-place ReLU, the skip reads ReLU(z) twice."""

    def __init__(self, inplace=False, rate=0.0):
        super().__init__()
        self.rate = rate
        self.conv, self.relu, self.head = nn.Conv2d(1, 3, 3), nn.ReLU(inplace=inplace), nn.Linear(3, 2)

    def forward(self, x):
        z = self.conv(x.to(self.conv.weight.dtype))  # a dtype read from the weights: float64 copies cast to float64
        if self.rate > 0:  # as timm does: dropout called only for a positive rate
            z = F.dropout(z, self.rate, self.training)
        y = self.relu(z) + z
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_the_same_architecture_is_recognised_across_builds_wrappers_and_precisions(recwarn):
    """Refused: an in-place ReLU where the skip then reads another tensor. Compared: another dropout rate (or
    none), a float64 copy, torch.nn.utils.prune or an old-style weight norm on one side, a compiled child
    (module or state dict, either side), DeepSpeed's bookkeeping attributes, hooks on the other network."""
    torch.manual_seed(0)
    net, shape = _Block().eval(), (1, 5, 5)
    inplace = _Block(inplace=True).eval()
    inplace.load_state_dict(net.state_dict())
    with pytest.raises(pm.ParameterMismatchError, match="inplace False in the model, True"):
        pm.path_metric(net, inplace, shape)
    twins = {"dropout": _Block(rate=0.3), "float64": copy.deepcopy(net).double(), "pruned": copy.deepcopy(net),
             "weight norm": copy.deepcopy(net), "bookkeeping": copy.deepcopy(net), "hooked": copy.deepcopy(net)}
    twins["dropout"].load_state_dict(net.state_dict())
    torch.nn.utils.prune.identity(twins["pruned"].conv, "weight")
    torch.nn.utils.weight_norm(twins["weight norm"].conv)
    twins["bookkeeping"].conv.ds_id = 7
    twins["hooked"].conv.register_forward_hook(lambda module, args, out: out * 2)
    compiled = copy.deepcopy(net)
    compiled.conv = torch.compile(compiled.conv)
    for name, twin in twins.items():
        assert pm.path_metric(net, twin.eval(), shape).value == pytest.approx(0, abs=1e-12), name
        assert pm.path_metric(twin, net, shape).value == pytest.approx(0, abs=1e-12), name
    for first, second in ((net, compiled), (compiled, net)):
        for other in (second, second.state_dict()):
            assert pm.path_metric(first, other, shape).value == 0
    assert not [w for w in recwarn if issubclass(w.category, pm.IgnoredHookWarning)]


def test_state_dict_hints():
    net, shape = make("tiny_conv", 0)
    prefixed = {f"module.{k}": v for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="strip the prefix 'module.'"):
        pm.path_metric(net, prefixed, shape)
    pruned = copy.deepcopy(net)
    torch.nn.utils.prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    state = pruned.state_dict()
    assert "0.weight_orig" in state and "0.weight" not in state
    torch.nn.utils.prune.remove(pruned[0], "weight")
    assert pm.path_metric(net, state, shape).value == pytest.approx(pm.path_metric(net, pruned, shape).value)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("kind", ["pruning", "same_sign", "general"])
def test_a_tracked_metric_and_l1_norm_at_one_moment_share_the_first_pass(kind, norm_first, monkeypatch):
    """The metric's first pass is the L1 path-norm's: at one moment the two evaluate one network less than
    apart, in either order, in two walks of the graph (the networks the kind needs evaluated together),
    and each equals its stand-alone value."""
    from pathmonitor import engine
    from pathmonitor.metrics import parameter_source
    from pathmonitor.tracking import TrackedModel

    net, shape = make("tiny_residual", 0)
    other = perturbed(net, kind, torch.Generator().manual_seed(1))
    reference = parameter_source(other)
    walks = []
    walk = engine.walk
    monkeypatch.setattr(engine, "walk",
                        lambda interpreters, keep: walks.append(len(interpreters)) or walk(interpreters, keep))
    tracked = TrackedModel(net, shape, synchronized=False).at("now")
    asked = [lambda: tracked.path_norm(1), lambda: tracked.path_metric(reference)]
    norm, metric = (asked[0](), asked[1]()) if norm_first else (asked[1](), asked[0]())[::-1]
    alone = {"pruning": 2, "same_sign": 3, "general": 4}[kind]
    assert metric.kind == kind and sum(walks) == alone and len(walks) == 2, walks
    expected = pm.path_metric(net, other, shape)
    assert (metric.value, metric.exact) == (pytest.approx(expected.value, rel=1e-12), expected.exact)
    assert metric.relative == pytest.approx(expected.relative, rel=1e-12)
    assert norm.value == float(pm.path_norm(net, shape))


@pytest.mark.parametrize("weight", [1.4216737747192383, 0.9200531244277954, 1.6288471221923828])
def test_identical_networks_are_at_path_metric_zero_exactly(weight):
    """Every log of a metric is taken alike: two logs of one total never differ by an ulp, which would
    leave a path-metric of 1e-16 between identical networks (these weights are where torch.log and
    math.log disagree in the last bit), alone or after the tracked L1 path-norm."""
    from pathmonitor.metrics import parameter_source
    from pathmonitor.tracking import TrackedModel

    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[2].weight.fill_(1.0)
    same = copy.deepcopy(net)
    metric = pm.path_metric(net, same, (1,))
    assert (metric.kind, metric.value, metric.log_value, metric.relative) == ("pruning", 0.0, -math.inf, 0.0)
    tracked = TrackedModel(net, (1,), synchronized=False).at("now")
    tracked.path_norm(1)
    assert tracked.path_metric(parameter_source(same)).value == 0.0


def test_identical_networks_are_at_zero_even_when_their_norms_came_from_different_modes():
    """A tracked L1 norm from a plain pass, then a reference whose plain pass fails (a zero head) makes the
    graph's later passes log-scaled: identical coordinates still give exactly 0, found by the comparison."""
    from pathmonitor.metrics import parameter_source
    from pathmonitor.tracking import TrackedModel

    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    with torch.no_grad():
        net[1].running_mean.normal_(), net[1].running_var.uniform_(0.5, 2)
    zero_head = copy.deepcopy(net)
    with torch.no_grad():
        zero_head[-1].weight.zero_(), zero_head[-1].bias.zero_()
    tracked = TrackedModel(net, (3, 12, 12), synchronized=False).at("now")
    tracked.path_norm(1)
    assert tracked.path_metric(parameter_source(zero_head)).kind == "pruning"
    metric = tracked.path_metric(parameter_source(copy.deepcopy(net)))
    assert (metric.value, metric.exact, metric.relative) == (0.0, True, 0.0)


def test_a_zero_branch_does_not_flush_the_rest_of_a_log_scaled_sum():
    """A branch whose activations leave float64 (1e800) ends in a zero layer: summed with the skip, its
    zeros must not carry their input's huge scale, which would round the skip's paths to nothing."""
    from oracle import Add

    def net(skip):
        layers = [nn.Linear(1, 1, bias=False).double() for _ in range(5)]
        shortcut = nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            for layer in layers[:4]:
                layer.weight.fill_(1e200)
            layers[4].weight.zero_()
            shortcut.weight.fill_(skip)
        return Add(nn.Sequential(*layers), shortcut)

    a, b = net(1.0), net(0.5)
    assert float(pm.path_norm(a, (1,))) == path_sum(neuron_dag(a, (1,)), 1.0) == 1.0
    metric = pm.path_metric(a, b, (1,))
    assert metric.exact and metric.value == pytest.approx(enumerated_path_metric(neuron_dag([a, b], (1,)))) == 0.5


def test_a_tracked_value_follows_parameters_replaced_by_other_tensors():
    """`load_state_dict(..., assign=True)` swaps in another model's tensors, whose version counters are the
    same as the replaced ones': not the same weights."""
    from pathmonitor.tracking import TrackedModel

    torch.manual_seed(0)
    net, other = (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(2))
    tracked = TrackedModel(net, (3,), synchronized=False)
    before = tracked.at("now").path_norm(1).value
    net.load_state_dict(other.state_dict(), assign=True)
    after = tracked.at("now").path_norm(1).value
    assert after == float(pm.path_norm(other, (3,))) != before


def test_a_nan_in_the_other_network_is_refused_not_read_as_equal():
    """sign(NaN) is 0, so a NaN passed every coordinate test and the metric came out 0, exact."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[0].bias[0] = math.nan
    with pytest.raises(pm.PathComputationError, match="NaN or infinite"):
        pm.path_metric(net, other, (3,))
    with pytest.raises(pm.PathComputationError, match="NaN or infinite"):
        pm.quantization_bound(net, lambda t: t * math.nan, (3,))


def test_batch_norms_with_different_eps_are_refused():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    other = copy.deepcopy(net)
    other[1].eps = 0.5
    with pytest.raises(pm.ParameterMismatchError, match="eps[ =].*0.5 in the other network"):
        pm.path_metric(net, other, (3,))


def test_two_separately_built_parametrized_networks_compare():
    """torch.nn.utils.parametrize gives every parametrized module a class of its own: the class it had before
    is what must match, and the path-metric reads the weights the parametrization computes."""
    def build():
        return nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2))

    torch.manual_seed(0)
    first, second = build(), build()
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    plain.load_state_dict({"0.weight": second[0].weight.detach(), "0.bias": second[0].bias.detach(),
                           "2.weight": second[2].weight.detach(), "2.bias": second[2].bias.detach()})
    assert pm.path_metric(first, second, (4,)).value == pm.path_metric(first, plain, (4,)).value > 0


def test_a_state_dict_and_a_restored_reference_are_read_on_the_model_device():
    """A checkpoint's tensors load on the CPU; a model elsewhere reads them on its own device (the meta device
    stands in for a GPU here)."""
    from pathmonitor.distributed import ShardedSnapshot
    from pathmonitor.sources import StateDictSource

    layer = nn.Linear(3, 2, device="meta")
    state = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    restored = ShardedSnapshot.from_state_dict({"pieces": dict(state), "shapes": {k: tuple(v.shape) for k, v in
                                                                                   state.items()},
                                                "sharded": False, "world_size": 1, "rank": 0})
    for source in (StateDictSource(state), restored):
        with source.tensors("", layer) as tensors:
            assert {t.device.type for t in tensors.values()} == {"meta"}
