"""The model zoo of timm, segmentation-models-pytorch and MONAI: computed or refused (and why), with the
time of the first call (capture: tracing with shapes, building the path graph, checking support) and of
a cached call of pm.path_norm.

    python benchmarks/zoo_capture.py
"""
from __future__ import annotations

import collections
import sys
import warnings
from pathlib import Path

import torch

import pathmonitor as pm
from common import timed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from zoo import NON_RELU_NETWORKS, RELU_NETWORKS  # noqa: E402


def _refusal(error: pm.UnsupportedModelError) -> str:
    kinds = collections.Counter(problem.kind for problem in error.problems)
    return "refused: " + ", ".join(f"{kind} x{count}" for kind, count in kinds.most_common(3))


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1\n")
    print("| model | input | parameters | result | first call (with capture) | cached path_norm |")
    print("|---|---|---|---|---|---|")
    for entry in RELU_NETWORKS + [entry for entry, _ in NON_RELU_NETWORKS]:
        torch.manual_seed(0)
        model = entry.build().eval()
        size = sum(p.numel() for p in model.parameters()) / 1e6
        shape = "x".join(map(str, entry.input_shape))
        with torch.no_grad():
            try:
                first = timed(lambda: pm.path_norm(model, entry.input_shape))
            except pm.UnsupportedModelError as error:
                first = timed(lambda: pm.check_support(model, entry.input_shape))  # capture again: the cost of refusing
                print(f"| {entry.name} | {shape} | {size:.2f}M | {_refusal(error)} | {first * 1e3:.0f} ms | |")
                continue
            cached = timed(lambda: pm.path_norm(model, entry.input_shape))
        print(f"| {entry.name} | {shape} | {size:.2f}M | computed | {first * 1e3:.0f} ms | {cached * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
