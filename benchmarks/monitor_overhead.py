"""Training time with the three monitors at their default cadence over the time without them, what
each monitor action costs, and the per-rank peak memory of one path-norm evaluation under ZeRO-3.

Runs (each a fresh process; ZeRO-3 with 2 CPU processes) alternate with and without monitors, so the
noise of a shared machine affects both alike; the figure is the ratio of the medians of `Trainer.fit`
wall time (Lightning's SimpleProfiler on in both, so that its own cost cancels). Beside it, the time
spent inside the monitors' hooks (the profiler's record, rank 0)
over the fit time of the same run, which does not depend on two noisy runs, and the mean cost of each
action: a drift at a checkpoint save, a bound at an epoch end, one path-norm evaluation, the set-up.
Tasks: the digits demo (5 epochs of 23 steps) and a torchvision resnet18 at 3x32x32 on random data
(4 epochs of 16 steps): epochs far shorter than real ones, so the per-epoch actions weigh heavily; and
resnet18 at CIFAR-10's batch size and epoch length (one epoch of 391 steps at batch 128, one process).
Peak memory: VmHWM (reset through /proc/self/clear_refs) above the resident set before one cached
path-norm evaluation on each ZeRO-3 rank, over the size of the largest module's parameters.

    python benchmarks/monitor_overhead.py [--repeats 3] [--tasks digits resnet18 resnet18-cifar]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402
from pytorch_lightning.profilers import SimpleProfiler  # noqa: E402

from common import child_results, rss  # noqa: E402
from tasks import MODES, TASKS, strategy_for  # noqa: E402
from pathmonitor.callbacks import GeneralizationBoundMonitor, PathMetricDrift, PathNormMonitor  # noqa: E402


class PeakMemory(Callback):
    """At the end of training: the resident-set peak of one cached path-norm evaluation on this rank."""

    def __init__(self, out: Path):
        self.out, self.monitor = out, PathNormMonitor()

    def setup(self, trainer, pl_module, stage):
        self.monitor.setup(trainer, pl_module, stage)

    def on_train_end(self, trainer, pl_module):
        tracked = self.monitor.tracked
        tracked.at("warm-up").path_norm()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system, so the peak shows
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        before = rss("VmRSS")
        tracked.at("measured").path_norm()
        peak = rss("VmHWM")
        largest = max(sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in m.parameters(recurse=False))
                      for m in pl_module.modules())
        total = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in pl_module.parameters())
        (self.out / f"memory{trainer.global_rank}.json").write_text(json.dumps(
            {"extra": peak - before, "largest_module": largest, "model": total}))


def child(task: str, mode: str, monitors: bool, out: Path, memory: bool) -> None:
    spec = TASKS[task]
    pl.seed_everything(0)
    callbacks = [PathNormMonitor(), PathMetricDrift(), GeneralizationBoundMonitor()] if monitors else []
    if memory:
        callbacks.append(PeakMemory(out))
    strategy, devices, batch = strategy_for(mode, spec.batch)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=spec.epochs,
                         callbacks=callbacks, default_root_dir=str(out), logger=pl.loggers.TensorBoardLogger(str(out)),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         max_steps=1 if memory else -1, profiler=SimpleProfiler())  # on both sides: same cost
    start = time.perf_counter()
    trainer.fit(spec.model(), spec.data(batch))
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        (out / "seconds.json").write_text(json.dumps({"fit": seconds,
                                                      "hooks": monitor_costs(trainer.profiler.recorded_durations)}))


MONITORS = ("PathNormMonitor", "PathMetricDrift", "GeneralizationBoundMonitor")


def monitor_costs(durations: dict[str, list[float]]) -> dict[str, float]:
    """Seconds spent in the monitors' hooks in all, and the mean of each action that does work."""
    def spent(monitor: str, hook: str = "") -> list[float]:
        return [d for action, ds in durations.items() if action.startswith(f"[Callback]{monitor}")
                and action.endswith(hook) for d in ds]

    evaluations = [d for d in spent("PathNormMonitor", ".on_train_batch_end") if d > 1e-3]  # steps that computed
    return {"total": sum(sum(spent(m)) for m in MONITORS),
            "drift_per_save": statistics.mean(spent("PathMetricDrift", ".on_save_checkpoint") or [0.0]),
            "bound_per_epoch": statistics.mean(spent("GeneralizationBoundMonitor", ".on_train_epoch_end") or [0.0]),
            "norm_per_evaluation": statistics.mean(evaluations or [0.0]),
            "setup": sum(sum(spent(m, hook)) for m in MONITORS for hook in (".setup", ".on_train_start"))}


def run(task: str, mode: str, monitors: bool, memory: bool = False) -> dict:
    # glibc raises its mmap threshold after large frees and then keeps freed blocks resident, which
    # would count memory released module by module as if it were held at once: fix the threshold
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if memory else None
    return child_results(__file__, [task, mode, str(int(monitors))] + (["--memory"] if memory else []), env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out, task, mode, monitors = args.child
        child(task, mode, bool(int(monitors)), Path(out), args.memory)
        return
    print(f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, CPU, median of {args.repeats} runs each\n")
    print("| task | strategy | fit without monitors | fit with the three monitors | ratio | time in the monitors' "
          "hooks / fit | drift per save | bound per epoch | one path-norm | set-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        spec = TASKS[task]
        for mode in spec.modes:
            run(task, mode, False)  # warm-up: caches, DeepSpeed's compiled op
            records: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(args.repeats):
                for monitors in (False, True):
                    records[monitors].append(run(task, mode, monitors)["seconds"])
            without, with_ = (statistics.median(r["fit"] for r in records[m]) for m in (False, True))
            hooks = {key: statistics.median(r["hooks"][key] for r in records[True])
                     for key in records[True][0]["hooks"]}
            share = statistics.median(r["hooks"]["total"] / r["fit"] for r in records[True])
            print(f"| {spec.label} | {MODES[mode]} | {without:.1f} s "
                  f"| {with_:.1f} s | {with_ / without:.3f}x | {share:.3f} | {hooks['drift_per_save'] * 1e3:.0f} ms "
                  f"| {hooks['bound_per_epoch'] * 1e3:.0f} ms | {hooks['norm_per_evaluation'] * 1e3:.0f} ms "
                  f"| {hooks['setup'] * 1e3:.0f} ms |", flush=True)
    if "resnet18" in args.tasks:
        peak_memory()


def peak_memory() -> None:
    memory = run("resnet18", "zero3", False, memory=True)
    print("\nOne path-norm evaluation of resnet18 (3x32x32) under ZeRO-3, per rank:\n")
    print("| rank | peak extra memory | largest module's parameters | ratio | whole model's parameters |")
    print("|---|---|---|---|---|")
    for rank in (0, 1):
        m = memory[f"memory{rank}"]
        print(f"| {rank} | {m['extra'] / 2**20:.1f} MiB | {m['largest_module'] / 2**20:.1f} MiB "
              f"| {m['extra'] / m['largest_module']:.2f} | {m['model'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
