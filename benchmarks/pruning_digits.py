"""Budgeted path-magnitude pruning against Lightning's `ModelPruning` (l1_unstructured) on the digits task.

Each run trains `DigitsNet` (width 16, Adam, 10 epochs, seed 0) with one pruner on the same schedule: a
round at the end of each of the epochs 1 to 6, the sparsity ramped cubically to the target at epoch 6
(for `ModelPruning`, whose `amount` is a fraction of what remains, the amount that reaches the same
ramp). `PathBudgetPruning` runs at budget 1 (the schedule decides) and at budget 0.1 (each round's
exact path-metric at most 10% of the L1 path-norm, so it may stop short of the target: the table says
where it got). Every setting also runs from a random function-preserving rescaling of the initial
network (`pm.random_rescale`, factors 1, 128, 4096). Reported: validation accuracy after the last
epoch and the sparsity reached. Then the cost of one pruning round (the demo's: budget 0.5, cap at
80%) over one training step (batch 64, forward, backward, Adam), both timed alternately on the same
trained network.

    python benchmarks/pruning_digits.py [--targets 0.5 0.8 0.9] [--repeats 5]
"""
from __future__ import annotations

import argparse
import logging
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelPruning
from torch import nn

import pathmonitor as pm
from pathmonitor.callbacks import PathBudgetPruning
from pathmonitor.callbacks.digits import DigitsData, DigitsNet
from pathmonitor.graph import capture
from pathmonitor.pruning import prune_round, ramped_sparsity
from pathmonitor.sources import ModuleSource
from common import side_by_side

EPOCHS, END, SHAPE = 10, 6, (1, 8, 8)
STEPS = 20  # training steps timed together against one round


def ramp(target: float, epoch: int) -> float:
    """The sparsity scheduled after `epoch` epochs (1 after the first): 0 at epoch 0, target from END on."""
    return ramped_sparsity(epoch, 0, END, target, "cubic")


def prunable(model: DigitsNet) -> list[nn.Module]:
    return [m for m in model.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def model_pruning(target: float, model: DigitsNet) -> ModelPruning:
    """ModelPruning on every conv / linear weight, globally, reaching ramp(target, e) after epoch e.
    Its `amount(current_epoch)` (0 for the first epoch) is a fraction of the weights still unpruned."""
    def amount(epoch: int) -> float:
        before, after = ramp(target, epoch), ramp(target, epoch + 1)
        return 0.0 if after <= before else (after - before) / (1 - before)

    return ModelPruning("l1_unstructured", amount=amount, use_global_unstructured=True, verbose=0,
                        parameters_to_prune=[(m, "weight") for m in prunable(model)], prune_on_train_epoch_end=True)


def ours(target: float, budget: float) -> PathBudgetPruning:
    return PathBudgetPruning(budget=budget, every_n_epochs=1, end=END, target_sparsity=target, module="net")


def sparsity(model: DigitsNet) -> float:
    weights = [m.weight for m in prunable(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def train(make_pruner, rescaled: bool) -> tuple[float, float]:
    """(validation accuracy, sparsity) after EPOCHS epochs with the pruner `make_pruner(model)` (None: dense)."""
    pl.seed_everything(0, verbose=False)
    model = DigitsNet(width=16)
    if rescaled:
        model.net = pm.random_rescale(model.net, generator=torch.Generator().manual_seed(0))
    pruner = make_pruner(model) if make_pruner is not None else None
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[pruner] if pruner is not None else [])
    data = DigitsData(batch_size=64)
    trainer.fit(model, data)
    accuracy = float(trainer.validate(model, data, verbose=False)[0]["val_acc"])
    return accuracy, sparsity(model)


def accuracy_table(targets: list[float]) -> None:
    dense = {rescaled: train(None, rescaled)[0] for rescaled in (False, True)}
    print(f"dense: val acc {dense[False]:.2%} (from the rescaled init: {dense[True]:.2%})\n")
    print("| target | pruner | val acc | sparsity | val acc, rescaled init | sparsity, rescaled init |")
    print("|---|---|---|---|---|---|")
    for target in targets:
        for label, make in (("PathBudgetPruning, budget 1", lambda model: ours(target, 1.0)),
                            ("PathBudgetPruning, budget 0.1", lambda model: ours(target, 0.1)),
                            ("ModelPruning l1_unstructured", lambda model: model_pruning(target, model))):
            (acc, kept), (acc_r, kept_r) = train(make, False), train(make, True)
            print(f"| {target:.0%} | {label} | {acc:.2%} | {kept:.1%} | {acc_r:.2%} | {kept_r:.1%} |", flush=True)


def round_cost(repeats: int) -> None:
    pl.seed_everything(0, verbose=False)
    model = DigitsNet(width=16)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    data = DigitsData(batch_size=64)
    trainer.fit(model, data)
    net, optimizer = model.net, torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = next(iter(data.train_dataloader()))
    graph, source = capture(net, SHAPE), ModuleSource(net)
    masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in net.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    cap = int(0.8 * sum(mask.numel() for mask in masks.values()))

    def steps() -> None:
        for _ in range(STEPS):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    # alternately, so that the machine's noise hits both alike
    medians = side_by_side({"round": lambda: prune_round(graph, net, source, masks, 0.5, cap), "steps": steps},
                           repeats)
    round_time, step_time = medians["round"], medians["steps"] / STEPS
    print(f"\none pruning round (budget 0.5, cap 80%, 4 re-scorings): {round_time * 1e3:.0f} ms; one training step: "
          f"{step_time * 1e3:.1f} ms; ratio {round_time / step_time:.0f}x (medians of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning_fabric"):  # per-round and per-run chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    accuracy_table(args.targets)
    round_cost(args.repeats)


if __name__ == "__main__":
    main()
