"""`PathBudgetPruning` in one process: masks that stick in the checkpoint under the model's own keys,
rounds within budget, resume, rescaling immunity against Lightning's `ModelPruning`, bad input."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ModelPruning
from torch import nn

import pathmonitor as pm
from pathmonitor.callbacks import MonitorError, PathBudgetPruning
from pathmonitor.callbacks.base import ends_the_epoch
from pathmonitor.callbacks.digits import DigitsData, DigitsNet
from test_monitor_setup import trainer
from test_regularizer import CountSteps

SHAPE = (1, 8, 8)


def data():
    return DigitsData(batch_size=32, limit=200, shuffle=False)  # 5 steps per epoch, the same batches on resume


class Rounds(pl.Callback):
    """Every round's logged values (read right after the pruning callback logs them)."""

    def __init__(self, pruning: PathBudgetPruning):
        self.pruning, self.seen = pruning, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.pruning.last:
            self.seen.append(dict(self.pruning.last, step=trainer.global_step))
            self.pruning.last = {}


def zeros_fraction(state: dict, masks: dict) -> float:
    zeros = sum(int((state[f"net.{name}.weight"] == 0).sum()) for name in masks)
    return zeros / sum(mask.numel() for mask in masks.values())


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """Adam, a round every 4 steps up to step 16 with a cubic ramp to 60% sparsity, 24 steps in all."""
    root = tmp_path_factory.mktemp("pruning")
    pl.seed_everything(0)
    pruning = PathBudgetPruning(budget=0.2, every_n_steps=4, end=16, target_sparsity=0.6, module="net")
    rounds = Rounds(pruning)
    fit = trainer(root, [pruning, rounds], max_steps=24)
    model = DigitsNet(width=4)
    fit.fit(model, data())
    fit.save_checkpoint(root / "final.ckpt")
    return root, pruning, rounds, model


def test_pruned_entries_are_exact_zeros_in_the_checkpoint_under_the_models_own_keys(pruned_run):
    root, pruning, rounds, model = pruned_run
    state = torch.load(root / "final.ckpt", weights_only=False)["state_dict"]
    assert not any(key.endswith(("_orig", "_mask")) for key in state)
    for name, mask in pruning.masks.items():
        weight = state[f"net.{name}.weight"]
        assert torch.all(weight[~mask] == 0), name
    assert [r["step"] for r in rounds.seen] == [4, 8, 12, 16]
    assert rounds.seen[-1]["prune/sparsity"] == pytest.approx(zeros_fraction(state, pruning.masks), abs=1e-12)
    assert rounds.seen[-1]["prune/sparsity"] > 0.3


def test_every_round_stays_within_its_budget_and_the_schedule(pruned_run):
    _, pruning, rounds, _ = pruned_run
    for r in rounds.seen:
        assert r["prune/change_relative"] <= 0.2
        assert r["prune/budget_spent"] == pytest.approx(r["prune/change_relative"] / 0.2)
        assert r["prune/removed"] > 0
        cubic = 0.6 * (1 - (1 - r["step"] / 16) ** 3)
        assert r["prune/sparsity"] <= cubic + 1e-2  # at most the ramp, rounded up to whole entries


def test_a_killed_and_resumed_run_ends_with_the_masks_of_an_uninterrupted_one(tmp_path, pruned_run):
    _, uninterrupted, _, whole = pruned_run
    pl.seed_everything(0)
    first = PathBudgetPruning(budget=0.2, every_n_steps=4, end=16, target_sparsity=0.6, module="net")
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=10)
    pl.Trainer(accelerator="cpu", max_steps=10, callbacks=[first, checkpoints], default_root_dir=str(tmp_path),
               logger=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0).fit(DigitsNet(width=4), data())
    resumed = PathBudgetPruning(budget=0.2, every_n_steps=4, end=16, target_sparsity=0.6, module="net")
    model = DigitsNet(width=4)
    trainer(tmp_path, [resumed], max_steps=24).fit(model, data(), ckpt_path=str(tmp_path / "epoch=1-step=10.ckpt"))
    assert resumed.masks.keys() == uninterrupted.masks.keys()
    for name in resumed.masks:
        assert torch.equal(resumed.masks[name], uninterrupted.masks[name]), name
    assert resumed.rounds == 2 + 2  # two before the kill, two after it


class Stop(Exception):
    pass


class StopAt(pl.Callback):
    """Kills the run as the batch of global step `step` starts."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Stop


def test_a_run_resumed_from_an_epoch_end_checkpoint_prunes_that_epoch_once(tmp_path):
    """With max_steps bounding the run, Lightning calls the end of the checkpoint's epoch again on resume."""
    def pruning():
        return PathBudgetPruning(budget=0.2, every_n_epochs=1, module="net")

    def run(root, callbacks, **kwargs):
        return pl.Trainer(accelerator="cpu", max_steps=15, max_epochs=-1, callbacks=callbacks, logger=False,
                          default_root_dir=str(tmp_path / root), enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, **kwargs)

    pl.seed_everything(0)
    whole = pruning()
    run("whole", [whole], enable_checkpointing=False).fit(DigitsNet(width=4), data())
    pl.seed_everything(0)
    killed = pruning()
    with pytest.raises(Stop):
        run("killed", [killed, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1), StopAt(7)]).fit(
            DigitsNet(width=4), data())
    resumed = pruning()
    run("resumed", [resumed], enable_checkpointing=False).fit(DigitsNet(width=4), data(),
                                                              ckpt_path=str(tmp_path / "epoch=0-step=5.ckpt"))
    assert resumed.rounds == whole.rounds == 3
    for name in whole.masks:
        assert torch.equal(resumed.masks[name], whole.masks[name]), name


def test_a_checkpoint_saved_at_an_epoch_end_validation_holds_that_epochs_round(tmp_path):
    """Validating every other epoch, Lightning saves at the validation's end, inside the epoch's last batch and
    before on_train_epoch_end: the round of that epoch comes first, so the checkpoint (the run's last one
    too) holds its zeros and its masks."""
    pl.seed_everything(0)
    pruning = PathBudgetPruning(budget=0.2, every_n_epochs=1, module="net")
    model = DigitsNet(width=4)
    pl.Trainer(accelerator="cpu", max_epochs=4, check_val_every_n_epoch=2, logger=False,
               callbacks=[pruning, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)], default_root_dir=str(tmp_path),
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(model, data())
    assert pruning.rounds == 4
    saved = torch.load(tmp_path / "epoch=3-step=20.ckpt", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("PathBudgetPruning")]
    assert state["rounds"] == 4 and state["last_step"] == 20
    for name, mask in pruning.masks.items():
        assert torch.equal(state["masks"][name], mask.cpu()), name
        assert torch.equal(saved["state_dict"][f"net.{name}.weight"] == 0, model.net.get_submodule(name).weight == 0)


@pytest.mark.parametrize("saved_key", ["current", "with the scope, as earlier versions kept it"])
def test_masks_survive_a_resume_with_another_scope_or_from_an_older_state_key(tmp_path, saved_key):
    pl.seed_everything(0)
    first = PathBudgetPruning(budget=0.2, every_n_steps=4, end=16, module="net")
    fit = trainer(tmp_path, [first], max_steps=5)
    fit.fit(DigitsNet(width=4), data())
    fit.save_checkpoint(tmp_path / "five.ckpt")
    if saved_key != "current":
        saved = torch.load(tmp_path / "five.ckpt", weights_only=False)
        saved["callbacks"] = {first._generate_state_key(scope="global", module="net"): state
                              for state in saved["callbacks"].values()}
        torch.save(saved, tmp_path / "five.ckpt")
    pruned = {name: ~mask for name, mask in first.masks.items()}
    assert sum(int(p.sum()) for p in pruned.values()) > 0
    resumed, model = PathBudgetPruning(budget=0.2, every_n_steps=4, end=16, module="net", scope="layer"), \
        DigitsNet(width=4)
    trainer(tmp_path, [resumed], max_steps=7).fit(model, data(), ckpt_path=str(tmp_path / "five.ckpt"))
    assert resumed.rounds == 1
    for name, gone in pruned.items():
        assert not bool(model.net.get_submodule(name).weight.detach()[gone].any()), name


def test_two_pruning_phases_on_one_module_keep_their_own_states(tmp_path):
    """A global phase, then a per-layer one: two callbacks on one module, told apart by their windows. A
    resume under a third window cannot tell which state is its own and says so."""
    def phases():
        return [PathBudgetPruning(budget=0.1, every_n_steps=2, start=1, end=4, module="net"),
                PathBudgetPruning(budget=0.1, every_n_steps=2, start=5, end=8, module="net", scope="layer")]

    pl.seed_everything(0)
    first = phases()
    fit = trainer(tmp_path, first, max_steps=8)
    fit.fit(DigitsNet(width=4), data())
    fit.save_checkpoint(tmp_path / "eight.ckpt")
    assert [c.rounds for c in first] == [2, 2]
    resumed = phases()
    trainer(tmp_path, resumed, max_steps=8).fit(DigitsNet(width=4), data(), ckpt_path=str(tmp_path / "eight.ckpt"))
    for before, after in zip(first, resumed):
        assert after.rounds == before.rounds and all(torch.equal(after.masks[n], m) for n, m in before.masks.items())
    with pytest.raises(MonitorError, match="2 pruning states for this module"):
        trainer(tmp_path, [PathBudgetPruning(budget=0.1, every_n_steps=2, end=8, module="net")], max_steps=9).fit(
            DigitsNet(width=4), data(), ckpt_path=str(tmp_path / "eight.ckpt"))


def test_another_fit_of_the_same_model_keeps_what_was_pruned(tmp_path):
    model = DigitsNet(width=4)
    pruning = PathBudgetPruning(budget=0.3, every_n_steps=2, end=2, module="net")
    trainer(tmp_path, [pruning], max_steps=3).fit(model, data())
    pruned = {name: ~mask for name, mask in pruning.masks.items()}
    assert sum(int(p.sum()) for p in pruned.values()) > 0
    trainer(tmp_path, [pruning], max_steps=3).fit(model, data())  # a fresh Adam, which masks must hold back
    for name, where in pruned.items():
        assert torch.all(model.net.get_submodule(name).weight[where] == 0), name
    start = MasksAtStart(pruning)
    trainer(tmp_path, [pruning, start], max_steps=2).fit(DigitsNet(width=4), data())
    assert start.all_kept  # another model starts unpruned


class MasksAtStart(pl.Callback):
    def __init__(self, pruning: PathBudgetPruning):
        self.pruning, self.all_kept = pruning, None

    def on_train_start(self, trainer, pl_module):
        self.all_kept = all(bool(mask.all()) for mask in self.pruning.masks.values())


class TiedToAnEmbedding(DigitsNet):
    def __init__(self):
        super().__init__(width=4)
        self.embedding = nn.Embedding(self.net[-1].weight.shape[1], self.net[-1].weight.shape[0])
        self.embedding.weight = self.net[-1].weight  # output-embedding tying: pruning would zero its entries too


def test_a_weight_tied_outside_the_watched_module_is_refused_before_the_first_step(tmp_path):
    counter = CountSteps()
    with pytest.raises(MonitorError, match=r"\['net.10.weight', 'embedding.weight'\] are one tensor"):
        trainer(tmp_path, [PathBudgetPruning(every_n_steps=2, module="net"), counter], max_steps=4).fit(
            TiedToAnEmbedding(), data())
    assert counter.steps == 0


def test_weights_computed_at_every_forward_are_refused_before_the_first_step(tmp_path):
    counter = CountSteps()
    model = DigitsNet(width=4)
    torch.nn.utils.prune.identity(model.net[10], "weight")
    with pytest.raises(MonitorError, match=r"\['10'\] are computed from other parameters"):
        trainer(tmp_path, [PathBudgetPruning(every_n_steps=2, module="net"), counter], max_steps=4).fit(model, data())
    assert counter.steps == 0


def test_rescaling_before_pruning_changes_no_mask_where_magnitude_pruning_changes_many(tmp_path):
    """One round at the first step, learning rate 0 and frozen batch-norm statistics, so the weights the
    round sees are the initial ones, once as they are and once after a function-preserving rescaling."""
    class Frozen(DigitsNet):
        def __init__(self):
            super().__init__(width=4, lr=0.0, bn_momentum=0.0)

    pl.seed_everything(0)
    net = Frozen()
    rescaled = Frozen()
    rescaled.load_state_dict(pm.random_rescale(net, generator=torch.Generator().manual_seed(1)).state_dict())
    initial = [{key: value.clone() for key, value in model.state_dict().items()} for model in (net, rescaled)]
    masks = []
    for model in (net, rescaled):
        pruning = PathBudgetPruning(budget=0.3, every_n_steps=1, end=1, module="net")
        trainer(tmp_path, [pruning], max_steps=1).fit(model, data())
        masks.append(pruning.masks)
    assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0])
    sparsity = 1 - sum(int(m.sum()) for m in masks[0].values()) / sum(m.numel() for m in masks[0].values())
    assert sparsity > 0.05
    lightning = []
    for model, state in zip((Frozen(), Frozen()), initial):
        model.load_state_dict(state)
        weights = [(m, "weight") for m in model.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        pruning = ModelPruning("l1_unstructured", amount=sparsity, parameters_to_prune=weights,
                               use_global_unstructured=True, make_pruning_permanent=False, apply_pruning=True,
                               verbose=0)
        trainer(tmp_path, [pruning], max_steps=-1, max_epochs=1, limit_train_batches=1).fit(model, data())
        lightning.append([m.weight_mask.clone() for m, _ in weights])
    assert not all(torch.equal(a, b) for a, b in zip(*lightning))


@pytest.mark.parametrize("make_callback,problem", [
    (lambda: PathBudgetPruning(budget=1.5), "budget"),
    (lambda: PathBudgetPruning(budget=0.0), "budget"),
    (lambda: PathBudgetPruning(target_sparsity=1.0, end=4), "target_sparsity"),
    (lambda: PathBudgetPruning(target_sparsity=0.5), "end"),
    (lambda: PathBudgetPruning(every_n_steps=2, every_n_epochs=1), "one of"),
])
def test_bad_arguments_are_refused_at_construction(make_callback, problem):
    with pytest.raises(ValueError, match=problem):
        make_callback()


@pytest.mark.parametrize("make_callback,problem", [
    (lambda: PathBudgetPruning(parameters_to_prune=[(nn.Linear(2, 2), "weight")]), "not in the watched model"),
    (lambda: PathBudgetPruning(every_n_steps=100), "never prune"),
    (lambda: PathBudgetPruning(every_n_steps=3, start=5, end=5), "never prune"),
    (lambda: PathBudgetPruning(every_n_epochs=3), "never prune"),  # max_steps=10 ends the 2nd epoch
    (lambda: PathBudgetPruning(every_n_steps=2, rewind_to=3), "rewind_to=3"),
])
def test_bad_input_fails_before_the_first_step(tmp_path, make_callback, problem):
    counter = CountSteps()
    with pytest.raises(MonitorError, match=problem):
        trainer(tmp_path, [make_callback(), counter], max_steps=10).fit(DigitsNet(width=4), data())
    assert counter.steps == 0


def test_parameters_to_prune_selects_and_make_permanent_false_leaves_prune_masks(tmp_path):
    model = DigitsNet(width=4)
    chosen = [(model.net[0], "weight"), (model.net[10], "weight")]
    pruning = PathBudgetPruning(every_n_steps=2, end=2, parameters_to_prune=chosen, make_permanent=False)
    trainer(tmp_path, [pruning], max_steps=3).fit(model, data())
    assert sorted(pruning.masks) == ["net.0", "net.10"]
    assert hasattr(model.net[0], "weight_mask") and torch.equal(model.net[0].weight_mask.bool(), pruning.masks["net.0"])


class EpochEndWeights(pl.Callback):
    """The conv / linear weights of `net` (and their Adam moments) at every epoch's end (its last batch, where
    the epoch's round comes), as this callback sees them: placed before the pruning callback, before its
    round; after it, after."""

    def __init__(self):
        self.weights, self.moments, self.adam_steps = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        if not ends_the_epoch(trainer):
            return
        epoch = trainer.current_epoch + 1
        chosen = {n: m.weight for n, m in pl_module.net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        self.weights[epoch] = {n: w.detach().clone() for n, w in chosen.items()}
        state = trainer.optimizers[0].state
        # a fresh start leaves no state: Adam creates it at its next step
        self.moments[epoch] = {n: state[w].get("exp_avg", torch.zeros(())).clone() for n, w in chosen.items()}
        self.adam_steps[epoch] = {n: float(state[w].get("step", 0)) for n, w in chosen.items()}


def test_rewinding_to_an_epoch_restores_the_survivors_and_clears_their_optimizer_state(tmp_path):
    pl.seed_everything(0)
    before, after = EpochEndWeights(), EpochEndWeights()
    pruning = PathBudgetPruning(budget=0.3, every_n_epochs=2, rewind_to=1, module="net")
    trainer(tmp_path, [before, pruning, after], max_steps=-1, max_epochs=2).fit(DigitsNet(width=4), data())
    assert pruning.rounds == 1
    for name, mask in pruning.masks.items():
        assert not torch.equal(before.weights[2][name], before.weights[1][name])  # training moved them
        assert torch.equal(after.weights[2][name], before.weights[1][name] * mask), name  # back to epoch 1
        assert torch.all(after.moments[2][name] == 0), name
        assert before.adam_steps[2][name] > 0 and after.adam_steps[2][name] == 0, name  # bias correction anew
    assert sum(int((~mask).sum()) for mask in pruning.masks.values()) > 0
