"""Training-step time with `PathNormRegularizer` over the time without it, at every_n_steps = 1 and 10.

Side by side in one run: each training run (a fresh process; ZeRO-3 with 2 CPU processes) cycles
through blocks of BLOCK steps without the penalty, with it at every step and with it every 10 steps
(the callback stays in place and is switched by its cadence), so that the machine's noise, which moves
separate runs by 20%, affects the three settings alike. A step is timed on rank 0 from the start of its
batch to its end (forward, backward, the regularizer's hook, the optimizer step); the figure is the
mean step of each setting over all its blocks (a mean, so that every 10th step's penalty counts), the
first cycle left out as warm-up. Tasks as in monitor_overhead.py: the digits demo and a torchvision
resnet18 at 3x32x32 on random data, at batch 32 and, on one process, at CIFAR-10's usual batch of 128.

    python benchmarks/regularizer_overhead.py [--cycles 6] [--tasks digits resnet18 resnet18-cifar]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402

from common import child_results  # noqa: E402
from pathmonitor.callbacks import PathNormRegularizer  # noqa: E402
from tasks import MODES, TASKS, strategy_for  # noqa: E402

BLOCK = 10  # steps per block: a multiple of 10, so that every block at every_n_steps=10 holds one penalty
SETTINGS = {"without": None, "every step": 1, "every 10 steps": 10}
NEVER = 10 ** 9  # a cadence no step reaches


class Blocks(Callback):
    """Switches the regularizer's cadence block by block and times every step under its setting."""

    def __init__(self, regularizer: PathNormRegularizer) -> None:
        self.regularizer = regularizer
        self.seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
        self.start, self.setting = 0.0, "without"

    def on_train_batch_start(self, trainer, *args) -> None:
        block = trainer.global_step // BLOCK
        self.setting = list(SETTINGS)[block % len(SETTINGS)]
        self.regularizer.every_n_steps = SETTINGS[self.setting] or NEVER
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step > BLOCK * len(SETTINGS):  # the first cycle warms up
            self.seconds[self.setting].append(time.perf_counter() - self.start)


def child(task: str, mode: str, cycles: int, out: Path) -> None:
    spec = TASKS[task]
    pl.seed_everything(0)
    regularizer = PathNormRegularizer(1e-3)
    blocks = Blocks(regularizer)
    strategy, devices, batch = strategy_for(mode, spec.batch)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=-1,
                         max_steps=BLOCK * len(SETTINGS) * (cycles + 1), callbacks=[blocks, regularizer],
                         default_root_dir=str(out), logger=False, enable_checkpointing=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(spec.model(), spec.data(batch))
    if trainer.is_global_zero:
        (out / "steps.json").write_text(json.dumps(blocks.seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out, task, mode, cycles = args.child
        child(task, mode, int(cycles), Path(out))
        return
    print(f"pytorch_lightning {pl.__version__}, CPU, mean step over {args.cycles} cycles of {BLOCK}-step blocks\n")
    print("| task | strategy | step without | every step | ratio | every 10 steps | ratio |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        spec = TASKS[task]
        for mode in spec.modes:
            steps = child_results(__file__, [task, mode, str(args.cycles)])["steps"]
            mean = {name: statistics.mean(values) for name, values in steps.items()}
            base = mean["without"]
            print(f"| {spec.label} | {MODES[mode]} | {base * 1e3:.1f} ms "
                  f"| {mean['every step'] * 1e3:.1f} ms | {mean['every step'] / base:.2f}x "
                  f"| {mean['every 10 steps'] * 1e3:.1f} ms | {mean['every 10 steps'] / base:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
