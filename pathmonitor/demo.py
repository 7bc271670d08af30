"""`make demo`: L1 and L2 path-norms of a few torchvision architectures at 3x224x224 (MATH.md section 2)."""
from __future__ import annotations

import math
import time

import torch

from .norms import log_path_norm


def main() -> None:
    import torchvision

    input_shape = (3, 224, 224)
    print(f"Path-norms of randomly initialized torchvision models at input {input_shape} (float64):")
    print(f"{'model':<16} {'log10 L1':>10} {'log10 L2':>10} {'seconds':>8}")
    for name in ("alexnet", "vgg11_bn", "resnet18", "resnet50", "squeezenet1_0", "densenet121"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)()
        start = time.perf_counter()
        with torch.no_grad():
            l1 = float(log_path_norm(model, input_shape, q=1)) / math.log(10)
            l2 = float(log_path_norm(model, input_shape, q=2)) / math.log(10)
        print(f"{name:<16} {l1:>10.2f} {l2:>10.2f} {time.perf_counter() - start:>8.2f}")


if __name__ == "__main__":
    main()
