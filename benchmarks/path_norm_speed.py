"""Time and peak extra memory of pm.path_norm against one plain float64 batch-1 forward.

Both are timed side by side in one run, interleaved, median of several repeats, so that the noise of a
shared machine affects them alike. Peak extra memory is read from the kernel's resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs) in a fresh subprocess per measurement, and reported
relative to the size of the model's own parameters and buffers.

    python benchmarks/path_norm_speed.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import subprocess
import sys

import torch

import pathmonitor as pm
from common import INPUT_SHAPE, model as _model, rss, side_by_side, timed

MODELS = ("resnet18", "resnet50", "timm/densenet121")


def time_ratio(name: str, repeats: int) -> dict:
    model = _model(name)
    floor_model = copy.deepcopy(model).double()
    ones = torch.ones((1,) + INPUT_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        first_call = timed(lambda: pm.path_norm(model, INPUT_SHAPE))
        medians = side_by_side({"floor": lambda: floor_model(ones),
                                "path_norm": lambda: pm.path_norm(model, INPUT_SHAPE)}, repeats)
    floor, path = medians["floor"], medians["path_norm"]
    return {"floor_s": floor, "path_norm_s": path, "ratio": path / floor, "first_call_s": first_call}


def _memory_child(name: str, what: str) -> None:
    model = _model(name)
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    ones = torch.ones((1,) + INPUT_SHAPE, dtype=torch.float64)
    floor_model = copy.deepcopy(model).double() if what == "floor" else None
    with torch.no_grad():
        if what == "steady":
            pm.path_norm(model, INPUT_SHAPE)  # capture once, measure a cached call
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        before = rss("VmRSS")
        if what == "floor":
            floor_model(ones)
        else:
            pm.path_norm(model, INPUT_SHAPE)
        peak = rss("VmHWM")
    print(json.dumps({"extra_bytes": peak - before, "model_bytes": model_bytes}))


def peak_memory(name: str, what: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, what], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(*args.memory_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {INPUT_SHAPE}, batch 1, "
          f"median of {args.repeats}\n")
    print("| model | float64 forward (floor) | path_norm | ratio | first call (with capture) "
          "| peak extra memory, path_norm / model size | first call / model size | float64 forward / model size |")
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        t = time_ratio(name, args.repeats)
        steady, first, floor = (peak_memory(name, w) for w in ("steady", "first", "floor"))
        size = steady["model_bytes"]
        print(f"| {name} | {t['floor_s'] * 1e3:.0f} ms | {t['path_norm_s'] * 1e3:.0f} ms | {t['ratio']:.2f}x "
              f"| {t['first_call_s'] * 1e3:.0f} ms | {steady['extra_bytes'] / size:.2f} "
              f"({steady['extra_bytes'] / 2**20:.0f} MiB / {size / 2**20:.0f} MiB) "
              f"| {first['extra_bytes'] / size:.2f} | {floor['extra_bytes'] / size:.2f} |")


if __name__ == "__main__":
    main()
