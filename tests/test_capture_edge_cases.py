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
    weight, bias = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    expected = float(weight[rows].abs().sum() + bias[rows].abs().sum())
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
    huge.weight.data.fill_(2.0)  # |w|^q = 2^1100 is beyond float64; (|w| / max |w|)^q is not
    assert float(pm.log_path_norm(huge, (3,), q=1100)) == pytest.approx((math.log(3) + 1100 * math.log(2)) / 1100,
                                                                          rel=1e-12)


def test_a_layer_whose_largest_w_to_the_q_underflows_to_zero_still_counts():
    """|w|^q = (1e-40)^10 is 0 in float64 while the layer's paths carry half the path-norm (1e270 before it):
    the plain pass must not take it for a layer of zeros."""
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        net[0].weight.fill_(1e27), net[2].weight.fill_(1e-40), net[2].bias.fill_(1e-13)
    expected = (math.log(2) - 130 * math.log(10)) / 10  # 1e270 * 1e-400 + (1e-13)^10
    assert float(pm.log_path_norm(net, (1,), q=10).detach()) == pytest.approx(expected, rel=1e-12)
    assert float(pm.path_norm(net, (1,), q=10).detach()) == pytest.approx(math.exp(expected), rel=1e-12)


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
    # a compiled child (`self.net = torch.compile(net)` in a LightningModule): traced through its original
    holder = nn.Sequential(nn.Identity(), torch.compile(net))
    assert float(pm.path_norm(holder, (4,)).detach()) == expected
    pruned = copy.deepcopy(net)
    with torch.no_grad():
        pruned[0].weight[0].zero_()
    assert pm.path_metric(holder, nn.Sequential(nn.Identity(), torch.compile(pruned)), (4,)).value == pytest.approx(
        expected - float(pm.path_norm(pruned, (4,)).detach()), rel=1e-12)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Linear(3, 3), nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # a side effect that tracing must not leave behind
        out = self.c2(torch.relu(self.c1(x)))
        out.add_(x)  # a statement: later reads of `out` see the sum
        out.mul_(2.0)
        return torch.relu(out)


class Written(InPlace):
    def forward(self, x):
        out = self.c2(torch.relu(self.c1(x)))
        out = out + x
        return torch.relu(out * 2.0)


def test_in_place_statements_change_later_reads_and_side_effects_are_undone():
    model, reference = InPlace().double(), Written().double()
    reference.load_state_dict(model.state_dict())
    assert float(pm.path_norm(model, (3,)).detach()) == pytest.approx(float(pm.path_norm(reference, (3,)).detach()),
                                                                       rel=1e-12)
    assert float(model.calls) == 0
    on_view = nn.Sequential(nn.Linear(3, 4), Fn(lambda x: x[:, :2].add_(1.0) * 0 + x))
    with pytest.raises(pm.UnsupportedModelError):
        pm.path_norm(on_view, (3,))


class ConstantMixing(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.register_buffer("offset", torch.full((1, 2), 7.0))
        self.how = how

    def forward(self, x):
        y = self.fc(x)
        if self.how == "cat":
            return torch.cat([y, torch.full((1, 2), 7.0)], 1)
        if self.how == "buffer":
            return torch.cat([y, self.offset], 1)
        if self.how == "int":
            return y.sum(1, dtype=torch.int64)
        return y.type_as(self.offset.long())


@pytest.mark.parametrize("how", ["cat", "buffer", "int", "type_as"])
def test_constant_tensors_and_integer_casts_are_rejected(how):
    with pytest.raises(pm.UnsupportedModelError, match="constant|non-floating"):
        pm.path_norm(ConstantMixing(how), (2,))


def test_cache_follows_function_and_container_attributes():
    class Configurable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.act = torch.relu
            self.scales = [1.0, 2.0]
            self.extra = (torch.ones(1),)

        def forward(self, x):
            return self.act(self.fc(x)) * self.scales[0]

    model = Configurable()
    first = float(pm.path_norm(model, (2,)).detach())
    model.scales[0] = 3.0
    assert float(pm.path_norm(model, (2,)).detach()) == pytest.approx(3 * first)
    model.extra = (torch.zeros(1),)
    assert float(pm.path_norm(model, (2,)).detach()) == pytest.approx(3 * first)
    model.act = torch.sigmoid
    with pytest.raises(pm.UnsupportedModelError, match="sigmoid"):
        pm.path_norm(model, (2,))


@pytest.mark.parametrize("step", [lambda y: torch.mul(input=y, other=3.0), lambda y: torch.add(input=y, other=y),
                                  lambda y: torch.div(input=y, other=4.0)])
def test_binary_ops_with_keyword_operands(step):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), Fn(step), nn.Linear(3, 1)).double()
    assert float(pm.path_norm(net, (3,)).detach()) == pytest.approx(_oracle(net, (3,)), rel=1e-9)


def test_bare_layers_as_models():
    torch.manual_seed(0)
    linear = nn.Linear(3, 2)
    expected = float(linear.weight.detach().double().abs().sum() + linear.bias.detach().double().abs().sum())
    assert float(pm.path_norm(linear, (3,)).detach()) == pytest.approx(expected, rel=1e-12)
    scores = pm.path_magnitude_scores(linear, (3,))
    assert list(scores) == ["weight"]
    torch.testing.assert_close(scores["weight"], linear.weight.detach().double().abs())  # one layer: |w_i| * 1
    other = copy.deepcopy(linear)
    with torch.no_grad():
        other.weight[0, 0] = 0
    removed = abs(float(linear.weight[0, 0].detach()))
    assert pm.path_metric(linear, other.state_dict(), (3,)).value == pytest.approx(removed, rel=1e-6)


def test_log_scaling_keeps_representable_values_after_extreme_renormalizations():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e152, 0.0], [0.0, 1e-300]], dtype=torch.float64))
        net[1].weight.copy_(torch.tensor([[1e152, 0.0], [0.0, 1.0]], dtype=torch.float64))
        net[1].bias.copy_(torch.tensor([0.0, 1e308], dtype=torch.float64))
    expected = math.log(1e304 + 1e-300 + 1e308)
    with torch.no_grad():
        assert float(pm.log_path_norm(net, (2,))) == pytest.approx(expected, rel=1e-12)


def test_scores_refuse_inference_mode_and_q_refuses_booleans():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pm.path_magnitude_scores(nn.Linear(2, 2), (2,))
    with pytest.raises(ValueError, match="q must be"):
        pm.path_norm(nn.Linear(2, 2), (2,), q=True)


def test_in_place_change_of_a_viewed_tensor_is_rejected():
    def step(x):
        flat = x.view(x.size(0), -1)
        x.add_(1.0 * x)  # would change `flat` too
        return flat

    with pytest.raises(pm.UnsupportedModelError, match="shares memory with a view"):
        pm.path_norm(nn.Sequential(nn.Linear(3, 4), Fn(step)), (3,))


class _InPlace(nn.Module):
    """`a`, then a change made in place through another name of its result, read through the first name."""

    def __init__(self, change):
        super().__init__()
        self.a, self.c, self.b, self.change = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(8, 1), change
        self.relu, self.identity, self.dropout = nn.ReLU(inplace=True), nn.Identity(), nn.Dropout(0.5)

    def forward(self, x):
        h = self.a(x)
        y = self.change(self, h, x)
        return self.b(torch.cat([h, y], 1))


def _residual_written_in_place(net, h, x):
    h += net.c(x)  # a pre-activation residual block written as `x += f(x)`: its caller's tensor changes
    return h


def _through_an_alias(alias):
    def change(net, h, x):
        y = alias(net, h)
        y.mul_(2)
        return y
    return change


def _copied_then_changed(net, h, x):
    copy = h.clone()  # a copy: the change below does not reach it
    h += net.c(x)
    return copy


@pytest.mark.parametrize("change", [
    _residual_written_in_place,
    _copied_then_changed,
    _through_an_alias(lambda net, h: F.dropout(h, 0.0)),
    _through_an_alias(lambda net, h: net.relu(h)),
    _through_an_alias(lambda net, h: net.identity(h)),
    _through_an_alias(lambda net, h: net.dropout(h)),
    _through_an_alias(lambda net, h: F.relu(h, inplace=True)),
    _through_an_alias(lambda net, h: h.relu_()),
], ids=["x += f(x)", "a copy, then x += f(x)", "F.dropout(p=0)", "nn.ReLU(inplace=True)", "nn.Identity", "nn.Dropout",
        "F.relu(inplace=True)", "relu_"])
def test_changes_in_place_through_another_name_of_a_tensor_reach_every_name(change):
    """Checked against the |w| network run eagerly on ones, where the aliasing happens for real."""
    torch.manual_seed(0)
    net = _InPlace(change).eval()
    surgery = copy.deepcopy(net).double()
    with torch.no_grad():
        for p in surgery.parameters():
            p.abs_()
        expected = float(surgery(torch.ones(1, 3, dtype=torch.float64)).sum())
    assert float(pm.path_norm(net, (3,)).detach()) == pytest.approx(expected, rel=1e-12)


def _added_to_a_slice(net, h, x):
    part = h[:, :2]
    part += net.c(x)[:, :2]  # changes h too
    return h


def _viewed_then_changed_through_an_alias(net, h, x):
    part = h[:, :2]
    net.identity(h).mul_(2)  # reaches `part` too
    return torch.cat([part, part], 1)


@pytest.mark.parametrize("change,problem", [
    (lambda net, h, x: torch.mul(h, 2, out=h), "out="),
    (_added_to_a_slice, "shares memory with a view"),
    (_viewed_then_changed_through_an_alias, "shares memory with a view"),
    (lambda net, h, x: h.float().mul_(2), "shares memory with a view"),
], ids=["out=", "+= on a slice", "a view, then in place through an alias", "in place on a cast"])
def test_in_place_changes_the_graph_cannot_follow_are_refused(change, problem):
    with pytest.raises(pm.UnsupportedModelError, match=problem):
        pm.path_norm(_InPlace(change).eval(), (3,))


class _PoolWithoutBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(2, 3, 3), nn.AdaptiveMaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x)[0])  # (C, H, W): PyTorch pools it unbatched


def test_a_pool_of_a_tensor_without_its_batch_dimension_is_refused():
    with pytest.raises(pm.PathComputationError, match="keep the batch dimension"):
        pm.path_norm(_PoolWithoutBatch(), (2, 5, 5))
