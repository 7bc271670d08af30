"""The shared training runs of tests/training_run.py, each started once per argument list in a test
session, and readers of what they wrote: event files, per-rank records, checkpoints."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pathmonitor.callbacks.digits import DigitsNet

REPO = Path(__file__).resolve().parent.parent
SHAPE = (1, 8, 8)
_RUNS: dict[tuple, Path] = {}


def train(tmp_root: Path, strategy: str, *extra: str) -> Path:
    """Run tests/training_run.py once per argument list; returns its output directory."""
    key = (strategy, *extra)
    if key not in _RUNS:
        out = tmp_root / f"{strategy}-{len(_RUNS)}"
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
        done = subprocess.run([sys.executable, str(REPO / "tests" / "training_run.py"), strategy, str(out), *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"training run {key} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        _RUNS[key] = out
    return _RUNS[key]


def scalars(out: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the run's TensorBoard event files."""
    accumulator = EventAccumulator(str(out / "tb" / "version_0"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


def records(out: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]


def weights(out: Path, strategy: str, checkpoint: str = "final.ckpt") -> DigitsNet:
    """The model of a checkpoint the run wrote."""
    model = DigitsNet(width=8)
    path = out / "ckpt" / checkpoint
    if strategy.startswith("zero"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))  # DeepSpeed's own consolidation
    else:
        state = torch.load(path, weights_only=False)["state_dict"]
    model.load_state_dict(state)
    return model


def close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
