"""Budgeted path-magnitude pruning rounds (pathmonitor.pruning, MATH.md sections 3 and 4): the budget is
never exceeded, the certificate holds on real data, masks are immune to rescaling, caps and scopes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pathmonitor as pm
from nets import make
from pathmonitor.graph import capture
from pathmonitor.masking import PlainMaskKeeper
from pathmonitor.pruning import Certified, prune_round, ramped_sparsity
from pathmonitor.scores import prunable_weights
from pathmonitor.sources import ModuleSource

NETS = ["conv_pool_chain", "residual_concat", "small_unet", "two_heads"]


def full_masks(net: nn.Module, shape) -> dict[str, torch.Tensor]:
    graph = capture(net, shape)
    return {name: torch.ones_like(net.get_submodule(name).weight, dtype=torch.bool)
            for name in dict.fromkeys(prunable_weights(graph, net).values())}


def round_of(net, shape, masks, budget, **kwargs):
    return prune_round(capture(net, shape), net, ModuleSource(net), masks, budget, **kwargs)


def applied(net: nn.Module, masks) -> nn.Module:
    pruned = copy.deepcopy(net)
    with torch.no_grad():
        for name, mask in masks.items():
            pruned.get_submodule(name).weight.mul_(mask)
    return pruned


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_each_round_stays_within_its_budget_and_reports_the_exact_change(name, scope):
    net, shape = make(name, 0)
    masks, total = full_masks(net, shape), None
    current = net
    for budget in (0.02, 0.05, 0.1):  # three successive rounds, each measured against its own start
        result = round_of(current, shape, masks, budget, scope=scope)
        pruned = applied(net, result.masks)
        metric = pm.path_metric(current, pruned, shape)
        assert metric.exact and metric.kind == "pruning"
        assert result.change_relative == pytest.approx(metric.relative, rel=1e-9)
        assert result.change_relative <= budget
        assert result.removed == sum(int(m.sum()) for m in masks.values()) - sum(int(m.sum()) for m in
                                                                                 result.masks.values())
        assert result.removed > 0
        masks, current = result.masks, pruned
        total = result.removed if total is None else total + result.removed
    assert total > 0


def test_a_round_removes_as_much_as_fits_one_more_would_exceed_the_budget():
    """With one chunk a round takes the largest prefix of one score order within the budget."""
    from pathmonitor.pruning import MaskedSource, _ascending_candidates

    net, shape = make("residual_concat", 0)
    masks = full_masks(net, shape)
    result = round_of(net, shape, masks, 0.05, chunks=1)
    order = _ascending_candidates(capture(net, shape), net, MaskedSource(ModuleSource(net), masks), masks, list(masks))
    one_more = {name: mask.clone() for name, mask in masks.items()}
    for name, indices in order.first(result.removed + 1).per_module():
        one_more[name].view(-1)[indices] = False
    assert pm.path_metric(net, applied(net, one_more), shape).relative > 0.05


def test_the_certificate_bounds_the_change_of_outputs_on_real_data():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)).double().eval()
    x = torch.tensor(load_digits().images, dtype=torch.float64).unsqueeze(1) / 16.0
    budget = Certified(change=2.0, input_bound=1.0)
    result = round_of(net, (1, 8, 8), full_masks(net, (1, 8, 8)), budget)
    assert result.removed > 0
    certified = max(budget.input_bound, 1.0) * result.change
    assert certified <= budget.change * (1 + 1e-12)
    with torch.no_grad():
        moved = (net(x) - applied(net, result.masks)(x)).abs().sum(dim=1)
    assert float(moved.max()) <= certified * (1 + 1e-9)
    assert float(moved.max()) > 0


def test_masks_are_immune_to_rescaling_where_magnitude_pruning_is_not():
    net, shape = make("small_unet", 0)
    rescaled = pm.random_rescale(net, generator=torch.Generator().manual_seed(3))
    masks = full_masks(net, shape)
    ours = round_of(net, shape, masks, 0.05)
    ours_rescaled = round_of(rescaled, shape, masks, 0.05)
    assert all(torch.equal(ours.masks[name], ours_rescaled.masks[name]) for name in masks)

    def magnitude_masks(model, count):
        weights = torch.cat([model.get_submodule(name).weight.detach().abs().flatten() for name in masks])
        threshold = weights.sort().values[count - 1]
        return {name: model.get_submodule(name).weight.detach().abs() > threshold for name in masks}

    plain, plain_rescaled = magnitude_masks(net, ours.removed), magnitude_masks(rescaled, ours.removed)
    assert not all(torch.equal(plain[name], plain_rescaled[name]) for name in masks)


def test_a_cap_stops_the_round_first():
    net, shape = make("conv_pool_chain", 0)
    result = round_of(net, shape, full_masks(net, shape), 1.0, max_removed=37)
    assert result.removed == 37
    assert round_of(net, shape, full_masks(net, shape), 0.05, max_removed=0).removed == 0


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan])
def test_bad_budgets_are_refused(bad):
    net, shape = make("conv_pool_chain", 0)
    with pytest.raises(ValueError, match="budget"):
        round_of(net, shape, full_masks(net, shape), bad)
    with pytest.raises(ValueError, match="Certified.change"):
        Certified(change=-1.0, input_bound=1.0)


def test_ramps():
    assert [ramped_sparsity(p, 0, 10, 0.8, "linear") for p in (0, 5, 10, 20)] == pytest.approx([0, 0.4, 0.8, 0.8])
    assert ramped_sparsity(5, 0, 10, 0.8, "cubic") == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert ramped_sparsity(-3, 0, 10, 0.8) == 0


class _Tied(nn.Module):
    """Two layers, one after the other, sharing one weight tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False), nn.Linear(6, 2, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_weights_are_refused_where_scores_and_masks_would_count_one_use():
    """Per-module masks and scores would each see the other use unpruned (a 0.1 budget let a round reach
    0.17): refused, while the untied layer stays scorable."""
    net = _Tied()
    with pytest.raises(ValueError, match=r"\['a.weight', 'b.weight'\] are one tensor"):
        round_of(net, (6,), full_masks(net, (6,)), 0.1)
    with pytest.raises(ValueError, match="tied weights"):
        pm.path_magnitude_scores(net, (6,), ["a.weight"])
    assert pm.path_magnitude_scores(net, (6,), ["c.weight"])["c.weight"].shape == (2, 6)


class _TwoNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)
        self.layers = nn.ModuleList([self.a])  # `a` again, as MONAI's DynUNet keeps its layers

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_module_registered_under_two_names_is_not_tied():
    scores = pm.path_magnitude_scores(_TwoNames(), (6,), ["a.weight"])
    assert scores["a.weight"].shape == (6, 6)


@pytest.mark.parametrize("optimizer, settings", [(torch.optim.NAdam, {}), (torch.optim.Rprop, {}),
                                                 (torch.optim.Adagrad, {"initial_accumulator_value": 0.3}),
                                                 (torch.optim.Adam, {}), (torch.optim.SGD, {"momentum": 0.9})])
def test_a_rewind_restarts_the_optimizer_state_as_a_new_optimizer_would(optimizer, settings):
    """After the reset, the next step from the rewound weights is a new optimizer's first step: NAdam's
    momentum product starts at 1 and Rprop's step sizes at lr, not at 0 (a learning-rate scheduler's
    `initial_lr` in the group is no setting of the optimizer)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 3))
    trained = optimizer([weight], lr=0.01, **settings)
    torch.optim.lr_scheduler.StepLR(trained, 10)
    for _ in range(3):
        weight.grad = torch.randn(5, 3)
        trained.step()
    rewound = weight.detach().clone()
    PlainMaskKeeper([trained]).optimizer_state({"w": weight}, {"w": torch.ones(5, 3, dtype=torch.bool)}, reset=True)
    gradient = torch.randn(5, 3)
    weight.grad = gradient.clone()
    trained.step()
    fresh_weight = nn.Parameter(rewound)
    fresh = optimizer([fresh_weight], lr=0.01, **settings)
    fresh_weight.grad = gradient.clone()
    fresh.step()
    assert torch.equal(weight.detach(), fresh_weight.detach())


def test_a_certified_budget_over_a_path_norm_below_float64_lets_every_round_fit():
    """40 layers of weights 1e-9: an L1 path-norm of 1e-335, below float64; the relative budget is infinite."""
    net = nn.Sequential(*[layer for _ in range(40) for layer in (nn.Linear(4, 4, bias=False), nn.ReLU())])
    with torch.no_grad():
        for layer in net[::2]:
            layer.weight.fill_(1e-9)
    assert pm.Certified(change=1.0, input_bound=1.0).relative_to(float(pm.log_path_norm(net, (4,)))) == math.inf
