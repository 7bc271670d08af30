"""Path-magnitude scores (MATH.md section 4)."""
import copy

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pathmonitor as pm
from nets import make
from random_nets import random_net


@pytest.mark.parametrize("name", ["conv_pool_chain", "residual_concat", "unet_like", "one_dimensional"])
def test_each_score_is_the_drop_in_l1_path_norm_when_that_weight_is_zeroed(name):
    net, shape = make(name, 0)
    net = net.double()
    scores = pm.path_magnitude_scores(net, shape)
    params = dict(net.named_parameters())
    with torch.no_grad():
        base = float(pm.path_norm(net, shape))
        g = torch.Generator().manual_seed(0)
        for weight_name, score in scores.items():
            assert score.shape == params[weight_name].shape and score.dtype == torch.float64
            for _ in range(3):
                i = int(torch.randint(score.numel(), (1,), generator=g))
                pruned = copy.deepcopy(net)
                dict(pruned.named_parameters())[weight_name].view(-1)[i] = 0
                drop = base - float(pm.path_norm(pruned, shape))
                assert float(score.view(-1)[i]) == pytest.approx(drop, rel=1e-7, abs=1e-12 * base), weight_name


def test_default_selection_and_pruned_entries():
    net, shape = make("conv_pool_chain", 1)
    scores = pm.path_magnitude_scores(net, shape)
    assert sorted(scores) == ["0.weight", "11.weight", "4.weight", "9.weight"]  # never BN or biases
    with torch.no_grad():
        net[4].weight[0, 0] = 0
    scores = pm.path_magnitude_scores(net, shape)
    assert bool((scores["4.weight"][0, 0] == 0).all()) and bool((scores["4.weight"][1:] > 0).all())
    only = pm.path_magnitude_scores(net, shape, parameters=["9.weight"])
    assert list(only) == ["9.weight"]
    torch.testing.assert_close(only["9.weight"], scores["9.weight"], rtol=1e-12, atol=0)
    for bad in (["1.weight"], ["0.bias"], ["nope.weight"]):
        with pytest.raises(ValueError, match="cannot score"):
            pm.path_magnitude_scores(net, shape, parameters=bad)


def test_relative_scores_and_sums():
    net, shape = make("residual_concat", 2)
    net = net.double()
    relative = pm.path_magnitude_scores(net, shape, relative=True)
    absolute = pm.path_magnitude_scores(net, shape)
    norm = float(pm.path_norm(net, shape).detach())
    for name in absolute:
        torch.testing.assert_close(relative[name] * norm, absolute[name], rtol=1e-12, atol=0)
    # every path from an input crosses the first conv exactly once, and no other path does: its scores
    # sum to the path-norm of the network without biases
    with torch.no_grad():
        no_bias = copy.deepcopy(net)
        for module in no_bias.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                module.bias.zero_()
        from_inputs = float(pm.path_norm(no_bias, shape))
    assert float(absolute["0.weight"].sum()) == pytest.approx(from_inputs, rel=1e-9)


def test_scores_are_rescaling_invariant_magnitudes_are_not():
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    rescaled = pm.random_rescale(net, generator=torch.Generator().manual_seed(1))
    shape = (3, 64, 64)
    before = pm.path_magnitude_scores(net, shape, relative=True)
    after = pm.path_magnitude_scores(rescaled, shape, relative=True)
    weights, rescaled_weights = dict(net.named_parameters()), dict(rescaled.named_parameters())
    changed = 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-300)
        changed += not torch.allclose(weights[name].abs(), rescaled_weights[name].abs())
    assert changed >= 10  # the plain magnitudes of most layers moved


def test_scores_leave_gradients_alone():
    net, shape = make("tiny_conv", 0)
    pm.path_magnitude_scores(net, shape)
    assert all(p.grad is None for p in net.parameters())
    frozen = copy.deepcopy(net).requires_grad_(False)
    torch.testing.assert_close(pm.path_magnitude_scores(frozen, shape)["0.weight"],
                               pm.path_magnitude_scores(net, shape)["0.weight"])


def test_zero_path_norm_duplicates_strings_and_modules_used_twice():
    net, shape = make("tiny_conv", 0)
    with torch.no_grad():
        dead = copy.deepcopy(net)
        dead[6].weight.zero_()
        dead[6].bias.zero_()
    scores = pm.path_magnitude_scores(dead, shape)
    assert all(bool((s == 0).all()) for s in scores.values())
    single = pm.path_magnitude_scores(net, shape, parameters="0.weight")
    doubled = pm.path_magnitude_scores(net, shape, parameters=["0.weight", "0.weight"])
    torch.testing.assert_close(single["0.weight"], doubled["0.weight"])
    assert list(doubled) == ["0.weight"]
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="'0' is applied twice"):
        pm.path_magnitude_scores(twice, (3,))


class Siamese(nn.Module):
    """One module on two parallel branches: every path crosses it once, so scores stay exact."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.shared(x)) + torch.relu(self.shared(x * 2.0)))


def test_module_on_parallel_branches_is_scored_exactly():
    model = Siamese().double()
    scores = pm.path_magnitude_scores(model, (3,))
    base = float(pm.path_norm(model, (3,)).detach())
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.shared.weight[1, 2] = 0
    assert float(scores["shared.weight"][1, 2]) == pytest.approx(base - float(pm.path_norm(pruned, (3,)).detach()),
                                                                 rel=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 20))
def test_scores_on_random_dags(seed):
    net, shape = random_net(seed)
    net = net.double()
    scores = pm.path_magnitude_scores(net, shape)
    params = dict(net.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base = float(pm.path_norm(net, shape))
        for name, score in scores.items():
            i = int(torch.randint(score.numel(), (1,), generator=g))
            original = float(params[name].view(-1)[i])
            params[name].view(-1)[i] = 0
            drop = base - float(pm.path_norm(net, shape))
            params[name].view(-1)[i] = original
            assert float(score.view(-1)[i]) == pytest.approx(drop, rel=1e-6, abs=1e-11 * base), name


def test_scores_plug_into_torch_prune_global_unstructured_as_importance_scores():
    """The README's recipe for users who keep torch.nn.utils.prune / Lightning's ModelPruning."""
    from torch.nn.utils import prune

    net, shape = make("residual_concat", 0)
    scores = pm.path_magnitude_scores(net, shape)
    parameters = [(net.get_submodule(name.rpartition(".")[0]), "weight") for name in scores]
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=0.5,
                              importance_scores={p: scores[name] for p, name in zip(parameters, scores)})
    flat = torch.cat([s.flatten() for s in scores.values()])
    cut = flat.sort().values[int(0.5 * flat.numel()) - 1]  # the largest score removed
    for (module, _), name in zip(parameters, scores):
        removed = module.weight_mask == 0
        assert torch.all(scores[name][removed] <= cut) and torch.all(scores[name][~removed] >= cut), name
    assert sum(int((m.weight_mask == 0).sum()) for m, _ in parameters) == int(0.5 * flat.numel())
