"""The `pathmonitor` command around the audit: the demo's comparison and config handling, the order of
the demo config's callbacks, usage mistakes, which file a drift error names, the report's tag patterns,
`--model` functions and the count of pruning masks applied."""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import pathmonitor as pm
from pathmonitor.callbacks import GeneralizationBoundMonitor, PathBudgetPruning, PathMetricDrift, PathNormRegularizer
from pathmonitor.callbacks.audit import main as audit
from pathmonitor.callbacks.checkpoints import load_model
from pathmonitor.callbacks.cli import main as cli
from pathmonitor.callbacks.digits import DigitsNet
from pathmonitor.callbacks.report import write_report
from shared_runs import REPO, SHAPE

MODEL = "pathmonitor.callbacks.digits:DigitsNet"
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def small_digits() -> DigitsNet:
    """A model built by a function, for `--model test_cli:small_digits`."""
    return DigitsNet(width=4)


def log10_l1(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(pm.log_path_norm(model, SHAPE)) / math.log(10)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """`pathmonitor demo -c configs/digits.yaml` for 3 steps, in this process: its trainers, what it printed
    and the warnings it raised."""
    from pathmonitor.callbacks.train import demo

    runs = tmp_path_factory.mktemp("demo") / "runs"
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as raised, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        dense, trained = demo(["-c", str(REPO / "configs" / "digits.yaml"), *TINY,
                               "--trainer.logger.init_args.save_dir", str(runs)])
    return {"dense": dense, "trained": trained, "printed": printed.getvalue(),
            "warnings": [str(warning.message) for warning in raised]}


def table_row(printed: str, name: str) -> list[str]:
    table = printed[printed.index("next to its dense twin"):].splitlines()
    return next(line for line in table if line.startswith(name)).split()[-2:]


def test_the_demo_table_shows_the_path_norm_of_the_final_weights(demo_run):
    """The monitor logs every 10 steps, so none of its values is the end's: the table computes the norm."""
    dense, trained = demo_run["dense"], demo_run["trained"]
    assert float(table_row(demo_run["printed"], "sparsity")[1].rstrip("%")) > 0  # a round changed the end's weights
    expected = [log10_l1(trainer.lightning_module) for trainer in (dense, trained)]
    assert table_row(demo_run["printed"], "log10 L1 path-norm") == [f"{value:.2f}" for value in expected]


def test_demo_takes_the_config_short_form(demo_run):
    """`-c` names the demo config: the dense twin runs without the callbacks that change the weights."""
    def changing(trainer) -> list:
        return [c for c in trainer.callbacks if isinstance(c, (PathBudgetPruning, PathNormRegularizer))]

    assert changing(demo_run["dense"]) == [] and len(changing(demo_run["trained"])) == 2
    assert table_row(demo_run["printed"], "sparsity")[0] == "0.00%"


def test_the_bound_describes_the_weights_the_checkpoint_holds(demo_run):
    """Pruning comes before the monitors in the demo config: the bound logged at the epoch's end is that
    of the pruned weights the checkpoint saved at that step holds."""
    trained = demo_run["trained"]
    monitor = next(c for c in trained.callbacks if isinstance(c, GeneralizationBoundMonitor))
    saved = load_model(Path(trained.checkpoint_callback.last_model_path)).model
    bound_norm = monitor.last["bound/log10_value"] - math.log10(monitor.last["bound/first_part"])  # L = 1
    assert math.isclose(bound_norm, log10_l1(saved), rel_tol=1e-9)


def test_no_warning_about_arguments_given_twice(demo_run, monkeypatch, capsys):
    assert not [message for message in demo_run["warnings"] if "args parameter" in message]
    monkeypatch.setattr(sys, "argv", ["pathmonitor", "fit", "--help"])
    with warnings.catch_warnings(record=True) as raised, pytest.raises(SystemExit) as done:
        warnings.simplefilter("always")
        cli()
    assert done.value.code == 0 and "--trainer" in capsys.readouterr().out
    assert not [w for w in raised if "args parameter" in str(w.message)]


def test_certify_demo_parses_its_arguments(monkeypatch, capsys):
    import pathmonitor.demo

    def never(*args: object) -> None:
        raise AssertionError("the demo ran")

    monkeypatch.setattr(pathmonitor.demo, "_norm_table", never)
    monkeypatch.setattr(pathmonitor.demo, "_certificates", never)
    for argv, code in ((["--help"], 0), (["--epochs", "3"], 2)):
        with pytest.raises(SystemExit) as done:
            cli(["certify-demo", *argv])
        assert done.value.code == code
    assert "usage: pathmonitor certify-demo" in capsys.readouterr().out


def test_an_unknown_command_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli(["bogus"])
    error = capsys.readouterr().err
    assert done.value.code == 2 and "'bogus'" in error
    assert all(name in error for name in ("fit", "predict", "demo", "certify-demo", "norm", "drift", "report"))


@pytest.mark.parametrize("argv, expected", [
    (["drift", "old.ckpt", "missing.ckpt", "--input-bound", "abc"], "--input-bound: invalid number value: 'abc'"),
    (["scores", "missing.ckpt", "--top", "x"], "--top: invalid integer value: 'x'"),
    (["norm", "missing.ckpt", "--q", "0"], "--q: must be a finite number >= 1, got 0"),
    (["bound", "missing.ckpt", "--n-samples", "0", "--input-bound", "1"], "--n-samples: must be an integer >= 1"),
    (["bound", "missing.ckpt", "--n-samples", "9", "--input-bound", "inf"],
     "--input-bound: must be a finite number > 0"),
    (["norm", "missing.ckpt", "--input-shape", "0", "8"], "--input-shape: must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_refused_before_any_file_is_read(argv, expected, capsys):
    with pytest.raises(SystemExit) as done:
        audit(argv)
    error = capsys.readouterr().err
    assert done.value.code == 2 and expected in error and "missing.ckpt" not in error, error


@pytest.mark.parametrize("bound", [math.inf, math.nan])
def test_drift_refuses_a_non_finite_input_bound(bound):
    with pytest.raises(ValueError, match="input_bound"):
        PathMetricDrift(input_bound=bound)


def audit_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert audit([*argv, "--model", MODEL]) == 2
    return capsys.readouterr().err.strip()


def test_drift_names_the_checkpoint_at_fault(tmp_path, capsys):
    torch.manual_seed(0)
    good, other, broken = tmp_path / "good.pt", tmp_path / "other.pt", tmp_path / "nan.pt"
    torch.save(DigitsNet().state_dict(), good)
    torch.save(DigitsNet().state_dict(), other)
    state = DigitsNet().state_dict()
    state["net.0.weight"][0, 0, 0, 0] = math.nan
    torch.save(state, broken)
    assert audit_error(capsys, "drift", str(good), str(broken)).startswith(f"pathmonitor drift: {broken}: ")
    assert audit_error(capsys, "drift", str(broken), str(good)).startswith(f"pathmonitor drift: {broken}: ")
    # an input shape NEW does not take is NEW's problem, not OLD's
    assert audit_error(capsys, "drift", str(good), str(other), "--input-shape", "3", "8", "8").startswith(
        f"pathmonitor drift: {other}: ")


class Padded(torch.nn.Module):
    """Same tensors whatever the padding and the pooling: only the trace tells the architectures apart."""

    def __init__(self, padding: int = 1, pool: str = "max"):
        super().__init__()
        self.pool = pool
        self.conv, self.head = torch.nn.Conv2d(1, 4, 3, padding=padding), torch.nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.nn.functional.adaptive_max_pool2d(h, 1) if self.pool == "max" else \
            torch.nn.functional.adaptive_avg_pool2d(h, 1)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("old_settings, named", [({"padding": 0}, "padding"), ({"pool": "avg"}, "adaptive_avg_pool2d"),
                                                 ({}, None)])
def test_drift_refuses_checkpoints_of_another_architecture(tmp_path, capsys, old_settings, named):
    """Same class, same tensors, another padding or pooling: another function, so no drift of 0 to certify it;
    a checkpoint that records empty hyper-parameters is built with none, not with NEW's."""
    new = Padded(padding=1)
    old = Padded(**old_settings)
    old.load_state_dict(new.state_dict())
    for model, name, settings in ((new, "new.ckpt", {"padding": 1}), (old, "old.ckpt", old_settings)):
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": settings}, tmp_path / name)
    argv = ["drift", str(tmp_path / "old.ckpt"), str(tmp_path / "new.ckpt"), "--input-shape", "1", "6", "6",
            "--model", "test_cli:Padded"]
    capsys.readouterr()
    if named is None:  # OLD is built with the default padding (1): the very network NEW is
        assert audit([*argv, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["value"] == 0
        return
    assert audit(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"pathmonitor drift: {tmp_path / 'old.ckpt'}: ") and "another architecture" in error
    assert named in error


def write_events(logdir: Path, series: dict[str, list[float]]) -> None:
    with SummaryWriter(str(logdir)) as writer:
        for tag, values in series.items():
            for step, value in enumerate(values):
                writer.add_scalar(tag, value, step)


def test_the_report_draws_every_exponent_prefix_and_the_regularizer(tmp_path):
    write_events(tmp_path / "run", {"pathnorm/log10_l3": [2.0, 1.5], "pathmetric_init/drift": [1.0, 3.0],
                                    "bound/value": [1e6, 2e6], "bound/gap": [-0.01, 0.02]})
    drawn = write_report(tmp_path / "run", tmp_path / "run.png")
    assert list(drawn["path-norm (log10)"]) == ["pathnorm/log10_l3"]
    assert drawn["path-metric drift"]["pathmetric_init/drift"] == [(0, 1.0), (1, 3.0)]
    write_events(tmp_path / "regularized", {"regularizer/penalty": [15.0, 14.0], "regularizer/weight": [0.1, 0.1]})
    drawn = write_report(tmp_path / "regularized", tmp_path / "regularized.png")
    assert list(drawn["regularizer"]) == ["regularizer/penalty", "regularizer/weight"]


def test_model_may_be_a_function_returning_it(tmp_path, capsys):
    model = small_digits()
    torch.save(model.state_dict(), tmp_path / "small.pt")
    capsys.readouterr()
    assert audit(["norm", str(tmp_path / "small.pt"), "--model", "test_cli:small_digits", "--json"]) == 0
    with torch.no_grad():
        expected = float(pm.path_norm(model, SHAPE))
    assert json.loads(capsys.readouterr().out)["norms"]["l1"] == expected


def test_only_masks_that_prune_count_as_applied(tmp_path, capsys):
    """A checkpoint saved before any round holds all-True masks: nothing was applied."""
    model = DigitsNet()
    ones = {name: torch.ones_like(model.get_submodule(name).weight, dtype=torch.bool) for name in ("net.0", "net.10")}
    for masks, applied in ((ones, 0), ({**ones, "net.10": ones["net.10"].clone().fill_(False)}, 1)):
        state = {"masks": masks, "rounds": applied}
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": {},
                    "callbacks": {"PathBudgetPruning{'scope': 'global', 'module': None}": state}},
                   tmp_path / "pruned.ckpt")
        capsys.readouterr()
        assert audit(["norm", str(tmp_path / "pruned.ckpt"), "--model", MODEL, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["pruning_masks_applied"] == applied


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "model."])
def test_a_checkpoint_of_a_wrapped_model_is_read_without_the_wrappers_prefix(tmp_path, capsys, prefix):
    """torch.compile's, DDP's or a LightningModule attribute's prefix on every entry: read as the model's own."""
    model = small_digits()
    torch.save({f"{prefix}{key}": value for key, value in model.state_dict().items()}, tmp_path / "wrapped.pt")
    capsys.readouterr()
    assert audit(["norm", str(tmp_path / "wrapped.pt"), "--model", "test_cli:small_digits", "--json"]) == 0
    with torch.no_grad():
        assert json.loads(capsys.readouterr().out)["norms"]["l1"] == float(pm.path_norm(model, SHAPE))
