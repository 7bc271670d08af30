"""Training-step time with `PathNormRegularizer` over the time without it, at every_n_steps = 1 and 10.

Runs (each a fresh process; ZeRO-3 with 2 CPU processes) alternate between the three settings, so the
noise of a shared machine affects all alike. A step is timed on rank 0 from the start of its batch to its
end (forward, backward, the regularizer's hook, the optimizer step); the figure is the mean step over
all steps of all runs of a setting (a mean, so that every 10th step's penalty counts), the first epoch
left out as warm-up. Tasks as in
monitor_overhead.py: the digits demo and a torchvision resnet18 at 3x32x32 on random data.

    python benchmarks/regularizer_overhead.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402

from pathmonitor.callbacks import PathNormRegularizer  # noqa: E402
from tasks import TASKS, zero3_strategy  # noqa: E402

SETTINGS = {"without": None, "every step": 1, "every 10 steps": 10}


class StepTimer(Callback):
    """Wall time of every training step after the first epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.current_epoch > 0:
            self.seconds.append(time.perf_counter() - self.start)


def child(task: str, mode: str, every: int, out: Path) -> None:
    make_model, make_data, batch, epochs = TASKS[task]
    pl.seed_everything(0)
    timer = StepTimer()
    callbacks = [timer] + ([PathNormRegularizer(1e-3, every_n_steps=every)] if every else [])
    strategy, devices, batch = zero3_strategy(batch) if mode == "zero3" else ("auto", 1, batch)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, callbacks=callbacks,
                         default_root_dir=str(out), logger=False, enable_checkpointing=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(make_model(), make_data(batch))
    if trainer.is_global_zero:
        (out / "steps.json").write_text(json.dumps(timer.seconds))


def run(task: str, mode: str, every: int) -> list[float]:
    out = Path(tempfile.mkdtemp(prefix="pathmonitor-bench-"))
    subprocess.run([sys.executable, __file__, "--child", task, mode, str(every), str(out)], check=True,
                   capture_output=True)
    return json.loads((out / "steps.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, mode, every, out = args.child
        child(task, mode, int(every), Path(out))
        return
    print(f"pytorch_lightning {pl.__version__}, CPU, mean step over {args.repeats} interleaved runs each\n")
    print("| task | strategy | step without | every step | ratio | every 10 steps | ratio |")
    print("|---|---|---|---|---|---|---|")
    for task in TASKS:
        for mode in ("single", "zero3"):
            run(task, mode, 0)  # warm-up: caches, DeepSpeed's compiled op
            steps: dict[str, list[float]] = {name: [] for name in SETTINGS}
            for _ in range(args.repeats):
                for name, every in SETTINGS.items():
                    steps[name] += run(task, mode, every or 0)
            mean = {name: statistics.mean(values) for name, values in steps.items()}
            base = mean["without"]
            print(f"| {task} | {'1 process' if mode == 'single' else 'ZeRO-3, 2 processes'} | {base * 1e3:.1f} ms "
                  f"| {mean['every step'] * 1e3:.1f} ms | {mean['every step'] / base:.2f}x "
                  f"| {mean['every 10 steps'] * 1e3:.1f} ms | {mean['every 10 steps'] / base:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
