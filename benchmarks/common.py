"""Shared helpers of the benchmarks: models, and interleaved side-by-side timing."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
import torchvision

INPUT_SHAPE = (3, 224, 224)


def model(name: str) -> torch.nn.Module:
    """A torchvision model by name, or a timm one as "timm/<name>" (random weights)."""
    torch.manual_seed(0)
    if name.startswith("timm/"):
        import timm
        return timm.create_model(name.removeprefix("timm/"), pretrained=False).eval()
    return getattr(torchvision.models, name)().eval()


def child_results(script: str, arguments: list[str], env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Run `script --child <scratch folder> *arguments` in a fresh process; the JSON files it wrote there, by stem.

    The scratch folder (logs, checkpoints) is removed afterwards: a benchmark of many runs would otherwise
    leave gigabytes behind.
    """
    with tempfile.TemporaryDirectory(prefix="pathmonitor-bench-") as scratch:
        subprocess.run([sys.executable, script, "--child", scratch, *arguments], check=True, capture_output=True,
                       env=env)
        return {path.stem: json.loads(path.read_text()) for path in Path(scratch).glob("*.json")}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def side_by_side(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each candidate, run in turn within every repeat after one warm-up call each."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def rss(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)
