"""Time of path-magnitude scores and of path-metrics against their floors, side by side in one run.

- scores: time over one float64 batch-1 forward plus backward (to the parameters) of the same model;
- path-metric between the model and a 50% magnitude-pruned copy, and the quantization bound (bf16):
  time over one float64 batch-1 forward.

    python benchmarks/quantities_speed.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy

import torch

import pathmonitor as pm
from common import INPUT_SHAPE, model, side_by_side


def _pruned(net: torch.nn.Module) -> torch.nn.Module:
    pruned = copy.deepcopy(net)
    with torch.no_grad():
        for module in pruned.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                w = module.weight
                w.mul_(w.abs() >= w.abs().flatten().median())
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {INPUT_SHAPE}, batch 1, "
          f"median of {args.repeats}\n")
    print("| model | forward (floor) | forward+backward (floor) | scores | scores / fwd+bwd "
          "| path_metric (pruned copy) | path_metric / fwd | quantization_bound (bf16) | quantization / fwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        net = model(name)
        floor_model = copy.deepcopy(net).double()
        pruned = _pruned(net)
        ones = torch.ones((1,) + INPUT_SHAPE, dtype=torch.float64)

        def forward():
            with torch.no_grad():
                floor_model(ones)

        def forward_backward():
            floor_model.zero_grad(set_to_none=True)
            floor_model(ones).sum().backward()

        t = side_by_side({
            "fwd": forward, "fwdbwd": forward_backward,
            "scores": lambda: pm.path_magnitude_scores(net, INPUT_SHAPE),
            "metric": lambda: pm.path_metric(net, pruned, INPUT_SHAPE),
            "quant": lambda: pm.quantization_bound(net, "bf16", INPUT_SHAPE),
        }, args.repeats)
        print(f"| {name} | {t['fwd'] * 1e3:.0f} ms | {t['fwdbwd'] * 1e3:.0f} ms | {t['scores'] * 1e3:.0f} ms "
              f"| {t['scores'] / t['fwdbwd']:.2f}x | {t['metric'] * 1e3:.0f} ms | {t['metric'] / t['fwd']:.2f}x "
              f"| {t['quant'] * 1e3:.0f} ms | {t['quant'] / t['fwd']:.2f}x |")


if __name__ == "__main__":
    main()
