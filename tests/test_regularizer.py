"""The path-norm penalty and `PathNormRegularizer` (MATH.md section 6): invariance, exact gradients on one
process and under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 (2 CPU processes), cadence, bad input, effect."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils import prune

import pathmonitor as pm
from nets import make
from pathmonitor.callbacks import MonitorError, PathNormRegularizer
from pathmonitor.callbacks.digits import DigitsData, DigitsNet
from pathmonitor.graph import capture
from pathmonitor.penalty import _op_by_op, path_norm_penalty, penalty_gradients
from pathmonitor.sources import ModuleSource
from regularizer_step import LR, WEIGHT, PenaltyOnly, model_for, randomize_batch_norms
from test_monitor_setup import Exotic, data, trainer

REPO = Path(__file__).resolve().parent.parent
SHAPE = (1, 8, 8)
REGULARIZED_WEIGHT = 0.1  # the demo's weight (configs/digits.yaml)
NETS = ["conv_pool_chain", "residual_concat", "unet_like", "functional_ops", "two_heads", "small_unet"]


def gradients(model: nn.Module, shape, q: float = 1.0, log: bool = True,
              dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    penalty = path_norm_penalty(model, shape, q, log, dtype)
    named = [(name, p) for name, p in model.named_parameters()]
    grads = torch.autograd.grad(penalty, [p for _, p in named], allow_unused=True)
    return {name: g for (name, _), g in zip(named, grads) if g is not None}


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("q", [1.0, 2.0])
def test_penalty_is_invariant_and_its_gradient_covariant_under_rescaling(name, q):
    """If theta' = D theta is a neuron-wise rescaling (D diagonal, positive), P(D theta) = P(theta) for every
    theta, hence D grad P(D theta) = grad P(theta): the gradient at D theta is D^-1 times the one at theta."""
    net, shape = make(name, 0)
    net = net.double()
    rescaled = pm.random_rescale(net, generator=torch.Generator().manual_seed(1))
    for log in (True, False):
        assert float(path_norm_penalty(rescaled, shape, q, log)) == pytest.approx(
            float(path_norm_penalty(net, shape, q, log)), rel=1e-10)
    original, moved = gradients(net, shape, q), gradients(rescaled, shape, q)
    assert original.keys() == moved.keys()
    params, rescaled_params = dict(net.named_parameters()), dict(rescaled.named_parameters())
    factors_seen = set()
    for key, grad in original.items():
        theta, theta_rescaled = params[key].detach(), rescaled_params[key].detach()
        nonzero = theta != 0
        d = torch.where(nonzero, theta_rescaled / torch.where(nonzero, theta, 1.0), 1.0)  # the diagonal of D
        factors_seen.update(round(float(f), 6) for f in d.unique())
        torch.testing.assert_close(moved[key][nonzero], (grad / d)[nonzero], rtol=1e-8, atol=1e-12 * grad.abs().max())
    assert len(factors_seen) > 2, "the rescaling moved too little to test anything"


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("q,log", [(1.0, True), (2.0, False)])
def test_the_op_by_op_gradient_of_sharded_models_equals_autograd(name, q, log):
    """The reverse pass that sharded models take, on a plain model, against one autograd graph."""
    net, shape = make(name, 0)
    expected = gradients(net, shape, q, log)
    got: dict[str, torch.Tensor] = {}

    def add(key, p, grad):
        got[key] = got.get(key, 0) + grad

    value = _op_by_op(capture(net, shape), net, ModuleSource(net), q, log, add, torch.float64)
    assert value == pytest.approx(float(path_norm_penalty(net, shape, q, log)), rel=1e-12)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=0)


def test_gradient_reaches_weight_orig_of_a_pruned_layer():
    net, shape = make("conv_pool_chain", 0)
    conv = net[0]
    prune.random_unstructured(conv, "weight", amount=0.5)
    grads = gradients(net, shape)
    assert "0.weight_orig" in grads and "0.weight" not in grads
    mask = conv.weight_mask
    assert torch.all(grads["0.weight_orig"][mask == 0] == 0) and torch.any(grads["0.weight_orig"][mask == 1] != 0)


class _TwoBranches(nn.Module):
    """x + g(x), g a width-1 chain of weights s, s, 1/s, 1/s: ||Phi||_q^q = 2, while g's activation is
    exactly 0 half-way in a plain float32 pass when s^(2q) < 1e-45."""

    def __init__(self, s: float):
        super().__init__()
        self.g = nn.Sequential(*[nn.Linear(1, 1, bias=False) for _ in range(4)])
        with torch.no_grad():
            for layer, w in zip(self.g, (s, s, 1 / s, 1 / s)):
                layer.weight.fill_(w)

    def forward(self, x):
        return x + self.g(x)


@pytest.mark.parametrize("name", NETS + ["beyond float32", "sinking in float32", "vanishing in float32",
                                  "a layer whose |w|^2 underflows"])
@pytest.mark.parametrize("q,log", [(1.0, True), (2.0, False)])
def test_the_float32_penalty_equals_the_float64_one_to_float32_round_off(name, q, log):
    """In float32 (what the regularizer uses for float32 models) the value and every gradient, by one
    autograd graph and op by op, match float64's to float32 round-off; also where a plain float32 pass
    overflows (a path-norm of 1e56), or sinks towards float32's subnormals or to 0, so running log-scales
    take over, and where |w|^q of a whole layer would underflow (formed from |w| / max |w| instead)."""
    if name == "a layer whose |w|^2 underflows":
        torch.manual_seed(0)
        net, shape = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,)
        with torch.no_grad():
            net[0].weight.mul_(1e-22), net[0].bias.mul_(1e-22)  # |w|^2 ~ 1e-45: below float32's subnormals
            net[2].bias.zero_()  # else it carries all but 1e-44 of the path-norm
    elif name == "beyond float32":
        net, shape = _chain(19, 8, 100.0), (8,)  # 8 (8 * 100)^19
    elif name == "sinking in float32":
        net, shape = _chain(22, 1, 1e4), (1,)
        with torch.no_grad():
            for layer in list(net)[:22:2]:
                layer.weight.fill_(1e-4)  # the activations reach 1e-44 half-way, the total is 1
    elif name == "vanishing in float32":
        net, shape = _TwoBranches(1e-23 if q == 1 else 1e-12), (1,)
    else:
        net, shape = make(name, 0)
    if log is False and name == "beyond float32":
        log = True  # the plain norm is refused beyond the dtype's range
    exact = gradients(net, shape, q, log)
    single = path_norm_penalty(net, shape, q, log, torch.float32)
    assert single.dtype == torch.float32
    assert float(single) == pytest.approx(float(path_norm_penalty(net, shape, q, log)), rel=1e-5)
    by_graph = gradients(net, shape, q, log, torch.float32)
    by_op: dict[str, torch.Tensor] = {}
    _op_by_op(capture(net, shape), net, ModuleSource(net), q, log,
              lambda key, p, grad: by_op.__setitem__(key, by_op.get(key, 0) + grad), torch.float32)
    for got in (by_graph, by_op):
        assert got.keys() == exact.keys()
        for key, grad in exact.items():
            torch.testing.assert_close(got[key].double(), grad.double(), rtol=1e-4, atol=1e-5 * float(grad.abs().max()))


def test_autocast_does_not_reach_the_penalty():
    """Added to a loss inside a bf16 autocast region (a training step), the float32 penalty and its gradient
    (taken outside the region, as torch recommends for every backward) are those computed outside it,
    batch-norm included."""
    net, shape = make("tiny_conv", 0)
    outside = path_norm_penalty(net, shape, dtype=torch.float32)
    expected = torch.autograd.grad(outside, list(net.parameters()), allow_unused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = path_norm_penalty(net, shape, dtype=torch.float32)
    got = torch.autograd.grad(inside, list(net.parameters()), allow_unused=True)
    assert float(inside) == float(outside)
    for a, b in zip(got, expected):
        assert (a is None and b is None) or torch.equal(a, b)


def test_a_graph_that_needed_log_scales_starts_with_them_next_time():
    """Every training step of a network beyond the plain range would otherwise pay for a wasted plain pass."""
    from pathmonitor import engine

    net = _chain(19, 8, 100.0)
    passes = []
    walk = engine.walk

    def counted(interpreters, keep):
        passes.extend(interpreter.log_scaled for interpreter in interpreters)
        return walk(interpreters, keep)

    with mock.patch.object(engine, "walk", counted):
        first = float(path_norm_penalty(net, (8,), dtype=torch.float32))
        second = float(path_norm_penalty(net, (8,), dtype=torch.float32))
        float(path_norm_penalty(net, (8,)))  # float64: in range, so plain
    assert passes == [False, True, True, False] and first == second


def test_a_path_norm_of_exactly_zero_does_not_send_later_passes_to_log_scales():
    """A pruning round first tries removing every weight: a bias-free net's path-norm is then exactly 0, which
    the log-scaled retry confirms; the plain pass was right, so later passes stay plain."""
    from pathmonitor import engine
    from pathmonitor.pruning import MaskedSource

    net = _chain(3, 4, 0.5)
    graph = capture(net, (4,))
    nothing = {name: torch.zeros(4, 4, dtype=torch.bool) for name in ("0", "2", "4")}
    source = ModuleSource(net)
    with torch.no_grad():
        assert float(pm.path_norm(net, (4,))) == 4 ** 4 * 0.5 ** 3  # 4^4 paths of weight 1/8
        zero = pm.norms.norm_and_log(graph, net, MaskedSource(source, nothing), 1.0)
    assert zero == (0.0, -math.inf) and engine._NEEDED_LOG_SCALES.get(graph) is None


def _chain(depth: int, width: int, value: float) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width, bias=False)
        nn.init.constant_(linear.weight, value)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


def test_log_penalty_is_exact_beyond_float64_and_the_plain_one_refuses():
    n, depth, w = 8, 120, 100.0  # ||Phi||_1 = n * (n w)^depth, about 1e349
    net = _chain(depth, n, w).double()
    penalty = path_norm_penalty(net, (n,))
    assert float(penalty) == pytest.approx(math.log(n) + depth * math.log(n * w), rel=1e-12)
    (grad,) = torch.autograd.grad(penalty, [net[0].weight])
    # ||Phi||_1 is 1-homogeneous in the first layer's n^2 equal weights: each gets d log||Phi|| / d w = 1/(n^2 w)
    assert torch.allclose(grad, torch.full_like(grad, 1.0 / (n * n * w)), rtol=1e-10)
    with pytest.raises(pm.PathComputationError, match="use log=True"):
        path_norm_penalty(net, (n,), log=False)


def test_a_zero_path_norm_has_no_log_and_a_zero_gradient():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    with pytest.raises(pm.PathComputationError, match="log=False"):
        path_norm_penalty(net, (4,))
    grads = gradients(net, (4,), log=False)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
    added = []
    value = penalty_gradients(capture(net, (4,)), net, ModuleSource(net), 1.0, True, lambda *args: added.append(args))
    assert value == -math.inf and added == []


def test_activations_sinking_towards_subnormals_switch_to_log_scales():
    """A width-1 chain of 32 weights 1e-10 then 32 weights 1e10: the activations reach 1e-320 half-way,
    while the total is about 1. d log||Phi|| / d w_i = 1 / w_i for every weight of a chain."""
    net = nn.Sequential(*[nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU()) for _ in range(64)]).double()
    with torch.no_grad():
        for i, block in enumerate(net):
            block[0].weight.fill_(1e-10 if i < 32 else 1e10)
    weights = [block[0].weight for block in net]
    penalty = path_norm_penalty(net, (1,))
    assert float(penalty) == pytest.approx(sum(math.log(float(w)) for w in weights), abs=1e-12)
    for w, g in zip(weights, torch.autograd.grad(penalty, weights)):
        assert float(g) == pytest.approx(1 / float(w), rel=1e-9)


@pytest.mark.parametrize("old_style", ["weight_norm", "spectral_norm"])
def test_hook_based_weight_reparametrizations_are_read_fresh(old_style):
    """torch.nn.utils.weight_norm / spectral_norm set `weight` in a forward pre-hook: after a training
    step it is stale and its graph freed; the penalty computes it from the parameters instead."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    getattr(torch.nn.utils, old_style)(net[0])
    net(torch.randn(4, 3)).sum().backward()
    with torch.no_grad():
        for p in net[0].parameters():
            p.mul_(1.5)
        net[0].weight = net[0]._forward_pre_hooks[next(iter(net[0]._forward_pre_hooks))].compute_weight(
            net[0], **({"do_power_iteration": False} if old_style == "spectral_norm" else {}))
        expected = float(path_norm_penalty(net, (3,)))
    net[0].weight = net[0].weight.detach() * 7  # a stale value, which must not be read
    grads = gradients(net, (3,))
    assert float(path_norm_penalty(net, (3,))) == pytest.approx(expected, rel=1e-12)
    assert all(torch.isfinite(g).all() for g in grads.values()) and "0.weight" not in grads


class _Named:
    def __init__(self, name, **attributes):
        self.__class__ = type(name, (), {})
        self.__dict__.update(attributes)


@pytest.mark.parametrize("managed,optimizer,problem", [(False, "DeepSpeedZeroOptimizer", "managed"),
                                                        (True, "BF16_Optimizer", "BF16_Optimizer")])
def test_deepspeed_set_ups_where_the_gradient_would_be_lost_are_refused(managed, optimizer, problem):
    from pathmonitor.callbacks.base import check_deepspeed_gradients

    engine = _Named("DeepSpeedEngine", optimizer=_Named(optimizer), managed_gradient_accumulation=lambda: managed)
    with pytest.raises(MonitorError, match=problem):
        check_deepspeed_gradients(engine, "PathNormRegularizer")


# -- one optimizer step with the regularizer alone, on every strategy ------------------------------------
_STEP_RUNS: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("regularizer")

    def run(strategy: str, accumulate: int) -> Path:
        key = (strategy, accumulate)
        if key not in _STEP_RUNS:
            out = root / f"{strategy}-{accumulate}"
            env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
            done = subprocess.run([sys.executable, str(REPO / "tests" / "regularizer_step.py"), strategy, str(out),
                                   "--accumulate", str(accumulate)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{key} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            _STEP_RUNS[key] = out
        return _STEP_RUNS[key]

    return run


def consolidated(out: Path, strategy: str) -> dict[str, torch.Tensor]:
    if strategy.startswith("zero"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(out / "final.ckpt"))  # the fp32 master weights
    return torch.load(out / "final.ckpt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("strategy", ["single", "ddp", "zero1", "zero2", "zero3", "fsdp2"])
def test_one_step_moves_every_parameter_by_the_penalty_gradient(step_run, strategy, accumulate):
    out = step_run(strategy, accumulate)
    init = torch.load(out / "init.pt")
    model = model_for("single")
    model.load_state_dict(init, strict=False)
    expected_grads = gradients(model, SHAPE)
    assert expected_grads.keys() == init.keys()
    expected = {key: init[key] - LR * WEIGHT * grad.to(torch.float32) for key, grad in expected_grads.items()}
    update = torch.cat([(expected[key] - init[key]).flatten() for key in expected])
    ranks = sorted(out.glob("rank*.pt"))
    assert len(ranks) == (1 if strategy == "single" else 2)
    for held in [torch.load(path) for path in ranks] + [consolidated(out, strategy)]:
        moved = torch.cat([(held[key] - init[key]).flatten() for key in expected])
        assert float((moved - update).norm() / update.norm()) < 1e-3
        for key in expected:
            torch.testing.assert_close(held[key], expected[key], rtol=1e-6, atol=0)
    logged = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    penalty = float(path_norm_penalty(model, SHAPE).detach())
    for record in logged:
        assert record["last"].keys() == {"regularizer/weight", "regularizer/penalty"}
        assert record["last"]["regularizer/weight"] == WEIGHT
        # the regularizer computes in the gradients' precision, float32 here
        assert record["last"]["regularizer/penalty"] == pytest.approx(penalty, rel=1e-6)
        assert record["global_step"] == 1


# -- the callback in one process ------------------------------------------------------------------------
class ManualPenaltyOnly(PenaltyOnly, DigitsNet):
    def __init__(self, optimizers: int = 1):
        super().__init__(width=3)
        randomize_batch_norms(self)
        self.automatic_optimization = False
        self.n_optimizers = optimizers

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=LR) for _ in range(self.n_optimizers)]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_manual_optimization_adds_the_penalty_at_each_optimizer_step(tmp_path, precision):
    """With manual optimization the step, and so the penalty, runs inside training_step, under autocast with
    mixed precision: the penalty's passes turn it off, and the step equals the automatic one's."""
    automatic, manual = model_for("single"), ManualPenaltyOnly()
    manual.load_state_dict(automatic.state_dict())
    for model in (automatic, manual):
        trainer(tmp_path, [PathNormRegularizer(WEIGHT)], max_steps=1, precision=precision).fit(model, data())
    for (key, a), m in zip(automatic.state_dict().items(), manual.state_dict().values()):
        torch.testing.assert_close(m, a, rtol=0, atol=0, msg=key)
    assert not torch.equal(automatic.net[0].weight, model_for("single").net[0].weight)
    with pytest.raises(MonitorError, match="single optimizer"):
        trainer(tmp_path, [PathNormRegularizer(WEIGHT)], max_steps=1).fit(ManualPenaltyOnly(optimizers=2), data())


def test_a_skipped_batch_gets_no_penalty_step(tmp_path):
    """`training_step` returning None skips the batch: Lightning still calls the optimizer, on no gradient."""
    model = model_for("single")
    skipping = type("Skipping", (type(model),), {"training_step": lambda self, batch, batch_idx: None})(width=3)
    skipping.load_state_dict(model.state_dict())
    regularizer = PathNormRegularizer(WEIGHT)
    trainer(tmp_path, [regularizer], max_steps=1).fit(skipping, data())
    for (key, before), after in zip(model.state_dict().items(), skipping.state_dict().values()):
        assert torch.equal(before, after), key
    assert regularizer.last == {}


class Recorder(pl.Callback):
    """The regularizer's logged values at every step (read right after it logs)."""

    def __init__(self, regularizer: PathNormRegularizer):
        self.regularizer, self.seen = regularizer, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen[trainer.global_step - 1] = dict(self.regularizer.last)
        self.regularizer.last = {}


def test_cadence_warmup_and_schedule(tmp_path):
    every = PathNormRegularizer(0.1, every_n_steps=3, warmup_steps=4)
    recorder = Recorder(every)
    trainer(tmp_path, [every, recorder], max_steps=8).fit(model_for("single"), data())
    weights = {step: values.get("regularizer/weight") for step, values in recorder.seen.items()}
    assert weights == {0: 0.0, 1: None, 2: None, 3: pytest.approx(0.075), 4: None, 5: None, 6: 0.1, 7: None}
    assert "regularizer/penalty" not in recorder.seen[0] and "regularizer/penalty" in recorder.seen[3]
    scheduled = PathNormRegularizer(1.0, schedule=lambda step: 0.01 * step)
    recorder = Recorder(scheduled)
    trainer(tmp_path, [scheduled, recorder], max_steps=3).fit(model_for("single"), data())
    assert [recorder.seen[s]["regularizer/weight"] for s in range(3)] == [0.0, 0.01, 0.02]


def test_every_n_steps_multiplies_the_weight_by_n(tmp_path):
    """Applied every 2 steps with twice the weight: one step moves the weights as twice the penalty would."""
    once, doubled = model_for("single"), model_for("single")
    doubled.load_state_dict(once.state_dict())
    trainer(tmp_path, [PathNormRegularizer(WEIGHT, every_n_steps=2)], max_steps=1).fit(once, data())
    trainer(tmp_path, [PathNormRegularizer(2 * WEIGHT)], max_steps=1).fit(doubled, data())
    for a, b in zip(once.parameters(), doubled.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class CountSteps(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.1", True])
def test_bad_weights_are_refused_at_construction(bad):
    with pytest.raises(ValueError, match="weight"):
        PathNormRegularizer(bad)


@pytest.mark.parametrize("make_callback,model,problem", [
    (lambda: PathNormRegularizer(0.1), lambda: Exotic(), "LayerNorm"),
    (lambda: PathNormRegularizer(0.1, input_shape=(3, 8, 8)), lambda: DigitsNet(width=4), "input_shape"),
    (lambda: PathNormRegularizer(0.1, schedule=lambda step: -1.0), lambda: DigitsNet(width=4), "schedule"),
    (lambda: PathNormRegularizer(0.1, schedule=lambda step: math.nan), lambda: DigitsNet(width=4), "schedule"),
    (lambda: PathNormRegularizer(0.1, schedule=lambda step: True), lambda: DigitsNet(width=4), "schedule"),
])
def test_bad_input_fails_before_the_first_step(tmp_path, make_callback, model, problem):
    counter = CountSteps()
    with pytest.raises(MonitorError, match=problem):
        trainer(tmp_path, [make_callback(), counter], max_steps=2).fit(model(), data())
    assert counter.steps == 0


def test_training_with_the_regularizer_shrinks_the_path_norm_tenfold_at_the_same_accuracy(tmp_path):
    results = {}
    for weight in (0.0, REGULARIZED_WEIGHT):
        pl.seed_everything(0)
        model = DigitsNet(width=16)
        callbacks = [PathNormRegularizer(weight)] if weight else []
        fit = trainer(tmp_path, callbacks, max_steps=-1, max_epochs=10)
        fit.fit(model, DigitsData())
        accuracy = fit.validate(model, DigitsData(), verbose=False)[0]["val_acc"]
        with torch.no_grad():
            results[weight] = (float(pm.path_norm(model, SHAPE)), accuracy)
    (plain_norm, plain_accuracy), (norm, accuracy) = results[0.0], results[REGULARIZED_WEIGHT]
    print(f"L1 path-norm {plain_norm:.4g} -> {norm:.4g}, validation accuracy {plain_accuracy:.4f} -> {accuracy:.4f}")
    assert norm * 10 <= plain_norm
    assert accuracy >= plain_accuracy - 0.02



def test_log_false_penalizes_the_norm_itself_inside_a_fit(tmp_path):
    """Lightning sets every callback's `log` attribute to the LightningModule's `log` method at fit start:
    the choice must live elsewhere, or log=False silently penalizes the logarithm (and the state key,
    holding the method's repr, would change between save and resume)."""
    regularizer = PathNormRegularizer(weight=1e-12, log=False)
    key = regularizer.state_key
    model = DigitsNet(width=4)
    trainer(tmp_path, [regularizer], max_steps=1).fit(model, data())
    assert regularizer.state_key == key
    with torch.no_grad():
        norm = float(pm.path_norm(model, SHAPE))  # after one tiny step: close to the penalized value
    assert regularizer.last["regularizer/penalty"] == pytest.approx(norm, rel=0.2)
    assert norm > 100  # far from its logarithm
