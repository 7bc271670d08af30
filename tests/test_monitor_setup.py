"""The monitors in one process: misconfiguration caught before the first step, loggers other than
TensorBoard, shared evaluations, state, the TensorBoard server and the `pathmonitor` command."""
from __future__ import annotations

import csv
import gc
import json
import math
import random
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler

import pathmonitor as pm
import pathmonitor.tracking
from pathmonitor.callbacks import GeneralizationBoundMonitor, MonitorError, PathMetricDrift, PathNormMonitor
from pathmonitor.callbacks.digits import DigitsData, DigitsNet

REPO = Path(__file__).resolve().parent.parent


class Exotic(pl.LightningModule):
    """A CNN with two layers outside the path model, and a count of training steps actually taken."""

    def __init__(self, example: bool = True):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
        self.head = nn.Sequential(nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 10))
        self.steps_taken = 0
        if example:
            self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        self.steps_taken += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    return pl.Trainer(accelerator="cpu", max_steps=kwargs.pop("max_steps", 4), callbacks=callbacks,
                      default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, **kwargs)


def data():
    return DigitsData(batch_size=32, limit=200)


def test_unsupported_layers_are_all_listed_before_the_first_step(tmp_path):
    model = Exotic()
    with pytest.raises(MonitorError) as caught:
        trainer(tmp_path, [PathNormMonitor()]).fit(model, data())
    message = str(caught.value)
    assert "head.0 (LayerNorm)" in message and "head.1 (GELU)" in message
    assert "module=" in message
    assert model.steps_taken == 0


def test_a_supported_sub_module_can_be_watched(tmp_path):
    model = Exotic()
    monitor = PathNormMonitor(module="features", every_n_steps=2)
    trainer(tmp_path, [monitor]).fit(model, data())
    assert model.steps_taken == 4
    assert monitor.last["pathnorm/l1"] == pytest.approx(float(pathmonitor.path_norm(model.features, (1, 8, 8))),
                                                         rel=1e-12)


class _BuiltLate(DigitsNet):
    def __init__(self):
        super().__init__(width=4)
        del self.net

    def build(self):
        if not hasattr(self, "net"):
            torch.manual_seed(0)
            self.net = DigitsNet(width=4).net


class LateDigits(_BuiltLate):
    """Its layers built in `configure_model` (as Lightning recommends for sharded training), which Lightning
    calls after every callback's `setup`."""

    def configure_model(self):
        self.build()


class OlderLateDigits(_BuiltLate):
    """The same with the hook's older name, which Lightning 2.6 still calls."""

    def configure_sharded_model(self):
        self.build()


@pytest.mark.parametrize("late", [LateDigits, OlderLateDigits])
def test_layers_built_in_configure_model_are_watched_regularized_and_pruned(tmp_path, late):
    from pathmonitor.callbacks import PathBudgetPruning, PathNormRegularizer

    def callbacks():
        return [PathNormRegularizer(0.1), PathBudgetPruning(budget=0.2, every_n_steps=2, module="net"),
                PathNormMonitor(every_n_steps=2)]

    first, model = callbacks(), late()
    fit = trainer(tmp_path, first, max_steps=4)
    fit.fit(model, data())
    fit.save_checkpoint(tmp_path / "four.ckpt")
    regularizer, pruning, monitor = first
    assert pruning.rounds == 2 and regularizer.last["regularizer/penalty"] > -math.inf
    with torch.no_grad():
        assert monitor.last["pathnorm/l1"] == pytest.approx(float(pm.path_norm(model, (1, 8, 8))), rel=1e-9)
    pruned = {name: ~mask for name, mask in pruning.masks.items()}
    resumed, model = callbacks(), late()
    trainer(tmp_path, resumed, max_steps=6).fit(model, data(), ckpt_path=str(tmp_path / "four.ckpt"))
    assert resumed[1].rounds == 3
    for name, gone in pruned.items():  # restored before the layers existed, and kept
        assert not bool(model.net.get_submodule(name).weight.detach()[gone].any()), name


def test_missing_input_shape_and_unknown_module_fail_clearly(tmp_path):
    with pytest.raises(MonitorError, match="input_shape=.*example_input_array"):
        trainer(tmp_path, [PathNormMonitor(module="features")]).fit(Exotic(example=False), data())
    with pytest.raises(MonitorError, match=r"no sub-module 'featurez'.*\['features', 'head'\]"):
        trainer(tmp_path, [PathMetricDrift(module="featurez")]).fit(Exotic(), data())


def test_two_drift_monitors_need_their_own_tags(tmp_path):
    with pytest.raises(MonitorError, match="prefix"):
        trainer(tmp_path, [PathMetricDrift(), PathMetricDrift(reference="init")]).fit(DigitsNet(width=4), data())


@pytest.mark.parametrize("callback, bad", [
    (PathNormMonitor, dict(q=0.5)), (PathNormMonitor, dict(q=())), (PathNormMonitor, dict(every_n_steps=0)),
    (PathNormMonitor, dict(log_on="batch")), (PathNormMonitor, dict(input_shape=(1, -8))),
    (PathMetricDrift, dict(reference="yesterday")), (PathMetricDrift, dict(input_bound=-1.0)),
    (PathMetricDrift, dict(prefix="")), (GeneralizationBoundMonitor, dict(loss_lipschitz=0)),
    (GeneralizationBoundMonitor, dict(gap_metrics="ab")), (GeneralizationBoundMonitor, dict(gap_kind="f1")),
    (GeneralizationBoundMonitor, dict(n_samples=0))])
def test_bad_arguments_are_refused_at_construction(callback, bad):
    with pytest.raises(ValueError):
        callback(**bad)


def test_csv_logger_gets_the_scalars_and_one_warning(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    callbacks = [PathNormMonitor(every_n_steps=2), GeneralizationBoundMonitor(gap_metrics=("nope", "nada"))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks, logger=logger, max_steps=10).fit(DigitsNet(width=4), data())  # 2 epochs
    layout_warnings = [w for w in caught if "custom-scalars" in str(w.message)]
    assert len(layout_warnings) == 1
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    norms = {int(row["step"]): float(row["pathnorm/l1"]) for row in rows if row.get("pathnorm/l1")}
    assert sorted(norms) == [2, 4, 6, 8, 10]
    assert any(row.get("bound/value") for row in rows)
    # the gap metrics named are not logged, so the callback measured the accuracy gap itself
    assert "measured" in callbacks[1].gap_source and "bound/gap" in callbacks[1].last


def test_monitors_share_one_evaluation_per_step(tmp_path, monkeypatch):
    calls = []
    original = pathmonitor.tracking.norm_and_log
    monkeypatch.setattr(pathmonitor.tracking, "norm_and_log", lambda *a: calls.append(a[-1]) or original(*a))
    callbacks = [PathNormMonitor(q=(1, 2), every_n_steps=2), PathNormMonitor(q=1, every_n_steps=2),
                 GeneralizationBoundMonitor()]
    trainer(tmp_path, callbacks, max_steps=6).fit(DigitsNet(width=4), data())  # epochs of 5 steps
    # steps 2, 4, 6: one L1 and one L2 evaluation each, however many monitors ask; the bound at the end
    # of epoch 1 (step 5) one more L1, and at the end of training (step 6) none: it shares step 6's
    assert sorted(calls) == [1.0] * 4 + [2.0] * 3
    assert callbacks[0].last["pathnorm/l1"] == callbacks[1].last["pathnorm/l1"]


class HalveWeights(pl.Callback):
    """Changes the weights in place at the end of every epoch, without an optimizer step (like pruning)."""

    def on_train_epoch_end(self, trainer, pl_module):
        with torch.no_grad():
            for p in pl_module.parameters():
                p.mul_(0.5)


def test_a_weight_change_between_two_monitors_at_one_step_is_seen(tmp_path):
    norm, bound = PathNormMonitor(log_on="epoch"), GeneralizationBoundMonitor(n_samples=160, input_bound=1.0)
    model = DigitsNet(width=4)
    trainer(tmp_path, [norm, HalveWeights(), bound], max_steps=5).fit(model, data())
    with torch.no_grad():
        expected = pathmonitor.generalization_bound(model, (1, 8, 8), n_samples=160, input_bound=1.0)
        before = norm.last["pathnorm/l1"]
    assert bound.last["bound/value"] == pytest.approx(expected.value, rel=1e-9)
    # the path-norm logged before the weights were halved is not reused (a halving changes it by 2^depth)
    assert bound.last["bound/value"] < bound.last["bound/first_part"] * before / 2


def test_a_second_fit_of_the_same_model_logs_its_own_values(tmp_path):
    model, monitor = DigitsNet(width=4), PathNormMonitor(log_on="epoch")
    trainer(tmp_path, [monitor], max_steps=5).fit(model, data())
    first = monitor.last["pathnorm/l1"]
    second_monitor = PathNormMonitor(log_on="epoch")
    trainer(tmp_path, [second_monitor], max_steps=5).fit(model, data())
    assert second_monitor.last["pathnorm/l1"] != first
    assert second_monitor.last["pathnorm/l1"] == pytest.approx(float(pathmonitor.path_norm(model, (1, 8, 8)).detach()),
                                                                 rel=1e-12)


def test_drift_between_checkpoints_refuses_weights_only_checkpoints(tmp_path):
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    run = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[PathMetricDrift(), checkpoints], logger=False,
                     enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(MonitorError, match="save_weights_only"):
        run.fit(DigitsNet(width=4), data())


def test_drift_between_checkpoints_beside_weight_averaging_says_what_its_series_follows(tmp_path):
    with pytest.warns(UserWarning, match="the checkpoints hold the averaged weights"):
        trainer(tmp_path, [PathMetricDrift(), pl.callbacks.WeightAveraging()], max_steps=1).fit(DigitsNet(width=4),
                                                                                               data())


def test_measured_gap_is_the_plain_accuracy_gap_and_leaves_training_as_it_was(tmp_path):
    def fit(callbacks):
        torch.manual_seed(0)
        model = DigitsNet(width=4)
        # no logged gap metrics: the monitor measures n, B and the accuracy gap itself
        trainer(tmp_path, callbacks, max_steps=5).fit(model, DigitsData(batch_size=32, limit=200))
        return model

    bound = GeneralizationBoundMonitor(gap_metrics=("absent_train", "absent_val"))
    watched, plain = fit([bound]), fit([])
    for a, b in zip(watched.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)  # same batches, same weights: the passes drew no random numbers
    data_module = DigitsData(batch_size=32, limit=200)
    data_module.setup("fit")
    watched.eval()
    with torch.no_grad():
        accuracy = [float((watched(d.tensors[0]).argmax(1) == d.tensors[1]).float().mean())
                    for d in (data_module.train_set, data_module.val_set)]
    assert bound.last["bound/gap"] == pytest.approx(accuracy[0] - accuracy[1], abs=1e-6)
    assert (bound.n_samples, bound.input_bound) == (160, 1.0)


class NoisyDigits(torch.utils.data.Dataset):
    """Digits with NumPy noise drawn in __getitem__, like an augmentation."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, y = self.base[index]
        return x + float(np.random.rand()) * 0.01, y


@pytest.mark.parametrize("loading", ["a sampler", "a sampler wrapped as under DDP", "persistent workers"])
def test_the_passes_over_the_data_use_the_training_sampler_and_no_randomness(tmp_path, loading):
    """Every random state the passes draw from is restored: also a custom sampler's generator inside the
    wrapper Lightning puts around it under DDP, and the worker processes a loader keeps between epochs."""
    digits = DigitsData(limit=200)
    digits.setup("fit")

    def fit(callbacks):
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        model = DigitsNet(width=4)
        sampler = SubsetRandomSampler(range(100), generator=torch.Generator().manual_seed(1))
        if loading == "a sampler wrapped as under DDP":
            sampler = DistributedSamplerWrapper(sampler, num_replicas=1, rank=0, shuffle=False)
        workers = {"num_workers": 1, "persistent_workers": True} if loading == "persistent workers" else {}
        train = DataLoader(NoisyDigits(digits.train_set), batch_size=16, sampler=sampler, **workers)
        trainer(tmp_path, callbacks, max_steps=7, use_distributed_sampler=False).fit(
            model, train, DataLoader(digits.val_set, batch_size=16))
        return model

    bound = GeneralizationBoundMonitor(gap_metrics=("absent_train", "absent_val"))
    watched, plain = fit([bound]), fit([])
    for a, b in zip(watched.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    assert bound.n_samples == 100  # what the sampler yields in an epoch, not the dataset's 160


def test_callbacks_reused_for_a_second_fit_log_it(tmp_path):
    model, callbacks = DigitsNet(width=4), [PathNormMonitor(log_on="epoch"), PathMetricDrift(every_n_steps=2),
                                            GeneralizationBoundMonitor()]
    trainer(tmp_path, callbacks, max_steps=5).fit(model, data())
    first = [dict(c.last) for c in callbacks]
    trainer(tmp_path, callbacks, max_steps=5).fit(model, data())
    with torch.no_grad():
        norm = float(pathmonitor.path_norm(model, (1, 8, 8)))
    assert callbacks[0].last["pathnorm/l1"] == pytest.approx(norm, rel=1e-12)
    assert all(c.last and c.last != f for c, f in zip(callbacks, first))


def test_measured_gap_runs_under_bf16_precision(tmp_path):
    bound = GeneralizationBoundMonitor(gap_metrics=("absent_train", "absent_val"))
    trainer(tmp_path, [bound], max_steps=5, precision="bf16-true").fit(DigitsNet(width=4), data())
    assert "bound/gap" in bound.last


def test_state_round_trips_and_tolerates_older_checkpoints():
    monitor = PathMetricDrift(reference="init")
    monitor.load_state_dict({})  # a checkpoint from before this callback had state
    monitor.last, monitor.last_step = {"pathmetric/drift": 1.5}, 12
    other = PathMetricDrift(reference="init")
    other.load_state_dict(monitor.state_dict())
    assert (other.last, other.last_step) == ({"pathmetric/drift": 1.5}, 12)
    assert PathMetricDrift().state_key != PathMetricDrift(reference="init").state_key


def test_values_given_to_the_bound_monitor_outlive_a_resume():
    measured = GeneralizationBoundMonitor()
    measured.n_samples, measured.input_bound = 160, 1.0
    given = GeneralizationBoundMonitor(n_samples=1000, input_bound=2.0)
    given.load_state_dict(measured.state_dict())
    assert (given.n_samples, given.input_bound) == (1000, 2.0)
    unknown = GeneralizationBoundMonitor()
    unknown.load_state_dict(measured.state_dict())
    assert (unknown.n_samples, unknown.input_bound) == (160, 1.0)


class Diverge(pl.Callback):
    """A weight becomes infinite after step 3, as in a run that diverged."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 3:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0, 0, 0] = float("inf")


def test_a_drift_that_cannot_be_computed_leaves_the_checkpoint_written(tmp_path):
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, filename="{step}")
    run = pl.Trainer(accelerator="cpu", max_steps=4, callbacks=[Diverge(), PathMetricDrift(), checkpoints],
                     logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="the checkpoint is saved all the same"):
        run.fit(DigitsNet(width=4), data())
    assert (tmp_path / "step=4.ckpt").exists()


class SavedWeights(pl.Callback):
    def __init__(self):
        self.saved = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved.append((trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()}))


def test_a_second_save_at_one_step_after_the_weights_changed_moves_the_reference(tmp_path):
    """5 steps an epoch: a save at step 5's batch end, then the weights halve at the epoch's end and another
    save follows; the drift at step 8 is against that last one."""
    model, saved, drift = DigitsNet(width=4), SavedWeights(), PathMetricDrift()
    checkpoints = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=5, save_top_k=-1),
                   pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_on_train_epoch_end=True, save_top_k=-1)]
    run = pl.Trainer(accelerator="cpu", max_steps=8, callbacks=[HalveWeights(), saved, drift, *checkpoints],
                     logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    run.fit(model, data())  # a checkpoint also at the end, step 8
    assert [step for step, _ in saved.saved][:3] == [5, 5, 8]
    reference = saved.saved[1][1]
    assert drift.last["pathmetric/drift"] == pytest.approx(pm.path_metric(model, reference, (1, 8, 8)).value, rel=1e-9)


def test_a_save_after_another_stage_on_another_model_logs_no_drift(tmp_path):
    drift = PathMetricDrift()
    run = trainer(tmp_path, [drift], max_steps=2)
    run.fit(DigitsNet(width=4), data())
    run.validate(DigitsNet(width=4), data())
    gc.collect()  # the fitted model is gone
    last = dict(drift.last)
    run.save_checkpoint(tmp_path / "after.ckpt")
    assert drift.last == last and (tmp_path / "after.ckpt").exists()


class Stream(torch.utils.data.IterableDataset):
    """40 samples, and no length."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(40):
            yield torch.rand(1, 8, 8, generator=generator) * 3, torch.tensor(0)


def test_the_training_set_pass_reads_one_epoch_as_the_trainer_limits_it(tmp_path):
    runs = {}
    for name, loader, limit in [("limited", data(), 2), ("stream", DataLoader(Stream(), batch_size=4), None),
                                ("limited stream", DataLoader(Stream(), batch_size=4), 3)]:
        runs[name] = GeneralizationBoundMonitor()
        trainer(tmp_path, [runs[name]], max_steps=2, limit_train_batches=limit, limit_val_batches=0).fit(
            DigitsNet(width=4), loader)
    assert runs["limited"].n_samples == 2 * 32
    assert runs["stream"].n_samples == 40 and 2.9 < runs["stream"].input_bound <= 3
    assert runs["limited stream"].n_samples == 3 * 4


def test_tracking_a_model_does_not_keep_it_alive():
    models = [DigitsNet(width=4) for _ in range(2)]
    for model in models:
        pathmonitor.tracking.tracked(model, (1, 8, 8), synchronized=False).at(0).path_norm(1.0)
    references = [weakref.ref(model) for model in models]
    del models, model
    gc.collect()
    assert all(reference() is None for reference in references)


def test_core_package_does_not_import_lightning():
    code = "import sys, pathmonitor; print(any('lightning' in m for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, deadline: float):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_real_tensorboard_server_serves_the_tags_and_the_bound_chart(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    callbacks = [PathNormMonitor(every_n_steps=2), PathMetricDrift(every_n_steps=2), GeneralizationBoundMonitor()]
    trainer(tmp_path, callbacks, logger=logger, max_steps=7).fit(DigitsNet(width=4), data())
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "tb"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/data/plugin"
        deadline = time.monotonic() + 120
        tags = _get_json(f"{base}/scalars/tags", deadline)
        while "version_0" not in tags and time.monotonic() < deadline:  # the server loads event files lazily
            time.sleep(0.5)
            tags = _get_json(f"{base}/scalars/tags", deadline)
        served = set(tags["version_0"])
        assert {"pathnorm/l1", "pathnorm/log10_l1", "pathmetric/drift", "bound/value", "bound/gap"} <= served
        layout = _get_json(f"{base}/custom_scalars/layout", deadline)
        chart = layout["category"][0]["chart"][0]
        assert chart["multiline"]["tag"] == ["bound/value", "bound/gap"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_pathmonitor_demo_trains_the_demo_config_next_to_its_dense_twin(tmp_path):
    command = [str(Path(sys.executable).parent / "pathmonitor"), "demo",
               "--config", str(REPO / "configs" / "digits.yaml"), "--trainer.max_epochs", "1"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "pathnorm/l1" in done.stdout and "tensorboard --logdir runs" in done.stdout
    assert "prune/sparsity" in done.stdout and "regularizer/penalty" in done.stdout
    table = done.stdout[done.stdout.index("next to its dense twin"):].splitlines()
    sparsity = next(line for line in table if line.startswith("sparsity")).split()
    assert sparsity[1] == "0.00%" and float(sparsity[2].rstrip("%")) > 10
    for name in ("digits", "digits_dense"):
        assert list((tmp_path / "runs" / name / "version_0").glob("events.out.tfevents.*")), name
    dense_config = (tmp_path / "runs" / "digits_dense" / "version_0" / "config.yaml").read_text()
    assert "PathNormMonitor" in dense_config and "PathBudgetPruning" not in dense_config
    assert f"report of the demo run: {Path('runs') / 'digits' / 'version_0' / 'report.png'}" in done.stdout
    assert (tmp_path / "runs" / "digits" / "version_0" / "report.png").is_file()
    # the audit command finds the model's class in a checkpoint LightningCLI wrote
    checkpoint = next((tmp_path / "runs" / "digits" / "version_0" / "checkpoints").glob("epoch=*.ckpt"))
    audit = subprocess.run([command[0], "norm", str(checkpoint), "--json"], capture_output=True, text=True,
                           timeout=300)
    assert audit.returncode == 0, audit.stderr
    model = pl.LightningModule.load_from_checkpoint(checkpoint)  # Lightning's own way back to the model
    with torch.no_grad():
        assert json.loads(audit.stdout)["norms"]["l1"] == pytest.approx(float(pm.path_norm(model, (1, 8, 8))),
                                                                         rel=1e-9)


def test_the_dense_twin_drops_the_callbacks_that_change_weights_however_spelled():
    from pathmonitor.callbacks.train import dense_twin

    config = {"trainer": {"callbacks": [{"class_path": "PathBudgetPruning"},
                                        {"class_path": "pathmonitor.callbacks.pruning.PathBudgetPruning"},
                                        {"class_path": "pathmonitor.callbacks.PathNormRegularizer",
                                         "init_args": {"weight": 0.1}},
                                        {"class_path": "pathmonitor.callbacks.PathNormMonitor"}],
                          "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger"}},
              "model": {"class_path": "pathmonitor.callbacks.digits.DigitsNet"}}
    twin = dense_twin(config)
    assert twin["trainer"]["callbacks"] == [{"class_path": "pathmonitor.callbacks.PathNormMonitor"}]
    assert twin["trainer"]["logger"]["init_args"]["name"] == "lightning_logs_dense"
    assert twin["model"] == config["model"] and len(config["trainer"]["callbacks"]) == 4  # the original untouched
    assert dense_twin({"trainer": {"devices": 2}}) == {"trainer": {"devices": 2}}  # a stacked strategy config
