"""`pathmonitor certify-demo`: path-norms of torchvision architectures, then a certified pruning and
quantization of ResNet-18 (docs/MATH.md sections 2-5)."""
from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Optional, Sequence

import torch

from .bounds import generalization_bound
from .metrics import path_metric, quantization_bound
from .norms import log_path_norm
from .rescale import random_rescale
from .scores import path_magnitude_scores

INPUT_SHAPE = (3, 224, 224)
DESCRIPTION = ("Path-norms of randomly initialized torchvision models, then a pruning and quantizations of ResNet-18 "
               "certified by path-metrics, and its generalization bound (minutes on a CPU).")


def _norm_table(torchvision) -> None:
    print(f"Path-norms of randomly initialized torchvision models at input {INPUT_SHAPE} (float64):")
    print(f"{'model':<16} {'log10 L1':>10} {'log10 L2':>10} {'seconds':>8}")
    for name in ("alexnet", "vgg11_bn", "resnet18", "resnet50", "squeezenet1_0", "densenet121"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)()
        start = time.perf_counter()
        with torch.no_grad():
            l1 = float(log_path_norm(model, INPUT_SHAPE, q=1)) / math.log(10)
            l2 = float(log_path_norm(model, INPUT_SHAPE, q=2)) / math.log(10)
        print(f"{name:<16} {l1:>10.2f} {l2:>10.2f} {time.perf_counter() - start:>8.2f}")


def _prune(model: torch.nn.Module, scores: dict[str, torch.Tensor], fraction: float) -> torch.nn.Module:
    """A copy of `model` with the `fraction` lowest-scoring weights (globally) set to zero."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    threshold = flat.kthvalue(max(1, int(fraction * flat.numel()))).values
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in pruned.named_parameters():
            if name in scores:
                parameter.mul_((scores[name] > threshold).to(parameter.dtype))
    return pruned


def _certificates() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    print("\nResNet-18: pruning 30% of the weights, scored by path-magnitude and by plain magnitude,")
    print("before and after a random function-preserving rescaling (factors 1, 128, 4096):")
    rescaled = random_rescale(model, generator=torch.Generator().manual_seed(0))
    for label, net in (("original", model), ("rescaled", rescaled)):
        path_scores = path_magnitude_scores(net, INPUT_SHAPE)
        plain = {name: p.detach().abs().double() for name, p in net.named_parameters() if name in path_scores}
        for method, scores in (("path-magnitude", path_scores), ("magnitude", plain)):
            metric = path_metric(net, _prune(net, scores, 0.3), INPUT_SHAPE)
            print(f"  {label:<9} {method:<15} certified change: {metric.relative:8.2%} of the L1 path-norm")
    print("\nQuantization certificates (upper bounds on the path-metric):")
    for name in ("fp16", "bf16", "int8"):
        print(f"  {name:<5} {quantization_bound(model, name, INPUT_SHAPE).relative:8.2%} of the L1 path-norm")
    bound = generalization_bound(model, INPUT_SHAPE, n_samples=1_268_355, input_bound=2.64)
    print(f"\nGeneralization bound constants: depth {bound.depth}, max-pool kernel {bound.max_pool_kernel}, "
          f"4CB/sqrt(n) = {bound.first_part:.4f}; bound = {bound.value:.3g} (vacuous for a dense network)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the demo; it takes no options, so `--help` (or anything else given) is answered before it starts."""
    argparse.ArgumentParser(prog="pathmonitor certify-demo", description=DESCRIPTION).parse_args(argv)
    import torchvision

    _norm_table(torchvision)
    _certificates()


if __name__ == "__main__":
    main()
