"""What one path-norm penalty costs on resnet18 (3x32x32) against the elementwise work any exact gradient
of it needs, side by side: a training step at batch 32 (forward, backward, SGD), one penalty gradient
(`penalty_gradients`, float32, added to the gradients), and, for every weight, |w| plus a weight-sized
gradient multiplied by sign(w) and added to the weight's gradient, with no convolution at all.

    python benchmarks/penalty_floor.py [--repeats 20]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

from common import side_by_side
from pathmonitor.gradients import gradient_adder
from pathmonitor.graph import capture
from pathmonitor.penalty import penalty_gradients
from pathmonitor.sources import ModuleSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    graph, source = capture(model, (3, 32, 32)), ModuleSource(model)
    weights = [p for p in model.parameters() if p.dim() > 1]

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def penalty() -> None:
        penalty_gradients(graph, model, source, 1.0, True, gradient_adder(model, 1.0), torch.float32)

    def floor() -> None:
        with torch.no_grad():
            for w in weights:
                magnitude = w.abs()
                gradient = torch.empty_like(magnitude).copy_(magnitude)  # stands for the convolution's output
                w.grad.addcmul_(gradient, w.sgn())

    step()  # every parameter has a gradient to add to
    times = side_by_side({"training step": step, "penalty": penalty, "elementwise floor": floor}, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats}\n")
    print("| training step (batch 32) | one penalty | elementwise floor | penalty / step | floor / step |")
    print("|---|---|---|---|---|")
    print(f"| {times['training step'] * 1e3:.1f} ms | {times['penalty'] * 1e3:.1f} ms "
          f"| {times['elementwise floor'] * 1e3:.1f} ms | {times['penalty'] / times['training step']:.2f} "
          f"| {times['elementwise floor'] / times['training step']:.2f} |")


if __name__ == "__main__":
    main()
