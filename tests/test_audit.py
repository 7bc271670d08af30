"""The `pathmonitor` audit commands on checkpoints written by the shared training runs (one process and
ZeRO-3, with pruning): `--json` values against the library on the same weights, bad input, the report."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pathmonitor as pm
from pathmonitor.callbacks.audit import main as audit
from pathmonitor.callbacks.report import PANELS, matching, write_report
from shared_runs import SHAPE, weights

MODEL = "pathmonitor.callbacks.digits:DigitsNet"
COMMAND = str(Path(sys.executable).parent / "pathmonitor")


def run_json(capsys, *argv: str) -> dict:
    capsys.readouterr()  # what the test itself printed before
    assert audit([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, nothing else on stdout
    return json.loads(out)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


@pytest.mark.parametrize("strategy", ["single", "zero3"])
def test_each_subcommand_equals_the_library_on_the_checkpoint(runs, capsys, strategy):
    out = runs(strategy)
    checkpoint = str(out / "ckpt" / "final.ckpt")  # a file for one process, a directory under ZeRO-3
    model = weights(out, strategy)  # consolidated by DeepSpeed's own utility in the test, not the command
    init = torch.load(out / "init.pt")
    with torch.no_grad():
        norms = run_json(capsys, "norm", checkpoint, "--model", MODEL, "--q", "1", "2")
        assert norms["checkpoint_kind"] == ("lightning" if strategy == "single" else "deepspeed")
        assert norms["pruning_masks_applied"] == 5
        for q in (1, 2):  # the library's own computation on the same weights: to the last bit
            assert norms["norms"][f"l{q}"] == float(pm.path_norm(model, SHAPE, q))
        drift = run_json(capsys, "drift", str(out / "init.pt"), checkpoint, "--model", MODEL, "--input-bound", "1")
        metric = pm.path_metric(model, init, SHAPE)  # current first, reference second
        assert close(drift["value"], metric.value) and close(drift["relative"], metric.relative)
        assert (drift["exact"], drift["kind"]) == (metric.exact, metric.kind)
        assert close(drift["certified_change"], metric.value)
        found = run_json(capsys, "bound", checkpoint, "--model", MODEL, "--n-samples", "480", "--input-bound", "1")
        expected = pm.generalization_bound(model, SHAPE, n_samples=480, input_bound=1.0)
        assert close(found["value"], expected.value) and found["depth"] == expected.depth
        assert close(found["first_part"], expected.first_part)
        for dtype in ("bf16", "int8"):
            quantized = run_json(capsys, "quantize", checkpoint, "--model", MODEL, "--dtype", dtype)
            assert close(quantized["value"], pm.quantization_bound(model, dtype, SHAPE).value)
    scores = run_json(capsys, "scores", checkpoint, "--model", MODEL, "--top", "5")
    relative = pm.path_magnitude_scores(model, SHAPE, relative=True)
    params = dict(model.named_parameters())
    for layer in scores["layers"]:
        weight = params[layer["weight"]]
        assert close(layer["path_mass_share"], float(relative[layer["weight"]].sum()))
        assert layer["sparsity"] == int((weight == 0).sum()) / weight.numel()
    alive = torch.cat([s[params[n] != 0] for n, s in relative.items()])
    assert close(scores["least"][0]["score_relative"], float(alive.min()))
    assert close(scores["most"][0]["score_relative"], float(alive.max()))
    top = scores["most"][0]
    assert close(float(relative[top["weight"]][tuple(top["index"])]), top["score_relative"])
    assert len(scores["least"]) == 5 and all(params[e["weight"]][tuple(e["index"])] != 0 for e in scores["least"])


def test_report_plots_the_logged_series(runs, tmp_path):
    out = runs("single")
    logdir = out / "tb" / "version_0"
    drawn = write_report(logdir, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    for panel, patterns in PANELS.items():
        tags = matching(patterns, accumulator.Tags()["scalars"])
        assert list(drawn[panel]) == tags, panel
        for tag in tags:  # every event, in order: a drift logged twice at one step (cadence and save) too
            expected = [(event.step, event.value) for event in accumulator.Scalars(tag)]
            assert drawn[panel][tag] == expected, tag
    assert drawn["sparsity"]["prune/sparsity"][-1][0] == 12


def _command(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def _bad_inputs(root: Path, out: Path) -> list[tuple[list[str], str]]:
    final = (out / "ckpt" / "final.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(final[:len(final) // 2])
    (root / "garbage.ckpt").write_bytes(bytes(range(256)) * 64)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), root / "resnet18.pt")
    torch.save(torchvision.models.mobilenet_v2().state_dict(), root / "mobilenet.pt")
    (root / "not_deepspeed").mkdir()
    (root / "empty_logs").mkdir()
    return [
        (["norm", str(root / "missing.ckpt"), "--model", MODEL], "missing.ckpt: no such file"),
        (["norm", str(root / "truncated.ckpt"), "--model", MODEL], "truncated.ckpt: cannot be read"),
        (["drift", str(root / "garbage.ckpt"), str(out / "ckpt" / "final.ckpt"), "--model", MODEL],
         "garbage.ckpt: cannot be read"),
        (["norm", str(root / "resnet18.pt"), "--model", MODEL], "resnet18.pt: does not fit DigitsNet"),
        (["scores", str(root / "not_deepspeed"), "--model", MODEL], "not_deepspeed: a directory, but not a DeepSpeed"),
        (["bound", str(root / "mobilenet.pt"), "--model", "torchvision.models:MobileNetV2", "--n-samples", "10",
          "--input-bound", "1", "--input-shape", "3", "32", "32"], "mobilenet.pt: "),
        (["norm", str(out / "ckpt" / "final.ckpt")], "pass --model"),
        (["report", str(root / "empty_logs"), "-o", str(root / "report.png")], "empty_logs: holds no TensorBoard"),
        (["report", str(out / "tb"), "-o", str(root / "empty_logs")], "empty_logs: is a directory"),
    ]


def test_bad_input_ends_with_one_line_naming_the_file_and_exit_code_2(runs, tmp_path):
    out = runs("single")
    errors = {}
    for argv, expected in _bad_inputs(tmp_path, out):
        done = _command(*argv, "--json", cwd=tmp_path)
        assert done.returncode == 2, (argv, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"pathmonitor {argv[0]}: ") and expected in lines[0], \
            (argv, done.stderr)
        assert done.stdout == ""
        errors[argv[1]] = lines[0]
    assert "ReLU6" in errors[str(tmp_path / "mobilenet.pt")]  # the unsupported layer is named
    assert not (tmp_path / "report.png").exists()
    debug = _command("norm", str(tmp_path / "missing.ckpt"), "--model", MODEL, "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_every_subcommand_has_help(tmp_path):
    for name in ("norm", "drift", "scores", "bound", "quantize", "report"):
        done = _command(name, "--help", cwd=tmp_path)
        assert done.returncode == 0 and "--json" in done.stdout, name


def test_the_command_alone_lists_every_subcommand(capsys):
    from pathmonitor.callbacks.cli import main

    for argv in ([], ["--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        shown = capsys.readouterr().out
        assert all(name in shown for name in ("fit", "demo", "certify-demo", "norm", "drift", "report"))


def test_json_output_of_a_deepspeed_checkpoint_is_the_only_output(runs, tmp_path):
    out = runs("zero3")
    done = _command("norm", str(out / "ckpt" / "final.ckpt"), "--model", MODEL, "--json", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.count("\n") == 1 and json.loads(done.stdout)["checkpoint_kind"] == "deepspeed"


def test_float64_checkpoints_keep_their_precision(tmp_path, capsys):
    """Two float64 checkpoints 1e-12 apart: the drift is the library's on the float64 weights, not the 0 a
    float32 copy would give."""
    from pathmonitor.callbacks.digits import DigitsNet

    torch.manual_seed(0)
    old = DigitsNet().double().eval()  # a bare state_dict is read into the default architecture
    new = DigitsNet().double().eval()
    new.load_state_dict(old.state_dict())
    with torch.no_grad():
        new.net[0].weight.add_(1e-12)
    torch.save(old.state_dict(), tmp_path / "old.pt")
    torch.save(new.state_dict(), tmp_path / "new.pt")
    found = run_json(capsys, "drift", str(tmp_path / "old.pt"), str(tmp_path / "new.pt"), "--model", MODEL)
    expected = pm.path_metric(new, old, SHAPE)
    assert expected.value > 0 and close(found["value"], expected.value)
