"""One figure of a training run, drawn from the TensorBoard event files the pathmonitor callbacks wrote:
path-norm (log10), path-metric drift, generalization bound against the measured gap, sparsity and the
regularizer's penalty. Tags are matched by pattern, so every exponent and every drift prefix is drawn."""
from __future__ import annotations

import fnmatch
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from .checkpoints import AuditError, quiet

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Series = dict[str, list[tuple[int, float]]]  # {tag: [(step, value), ...]}

# {panel: tag patterns}: PathNormMonitor logs one log10 series per exponent, PathMetricDrift one drift per prefix
PANELS: dict[str, tuple[str, ...]] = {
    "path-norm (log10)": ("pathnorm/log10_l*",),
    "path-metric drift": ("*/drift",),
    "bound vs gap": ("bound/value", "bound/gap"),
    "sparsity": ("prune/sparsity",),
    "regularizer": ("regularizer/*",),
}
_LOG_SCALE = {"path-metric drift", "bound vs gap"}


def matching(patterns: Sequence[str], tags: Iterable[str]) -> list[str]:
    """The tags that match any of the patterns (fnmatch, `*` crossing `/`), in the patterns' order, then by name."""
    tags = sorted(tags)
    return list(dict.fromkeys(tag for pattern in patterns for tag in tags if fnmatch.fnmatchcase(tag, pattern)))


def read_scalars(logdir: Path) -> Series:
    """{tag: [(step, value), ...]} of every scalar in the run's event files (one run directory)."""
    if not logdir.is_dir():
        raise AuditError(logdir, "no such directory")
    runs = sorted({path.parent for path in logdir.rglob("events.out.tfevents.*")})
    if not runs:
        raise AuditError(logdir, "holds no TensorBoard event files")
    if len(runs) > 1:
        raise AuditError(logdir, f"holds {len(runs)} runs ({', '.join(str(r.relative_to(logdir)) for r in runs[:4])}"
                                 f"{', ...' if len(runs) > 4 else ''}): pass one of them")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with quiet():
        accumulator = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
        accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def write_report(logdir: Path, output: Path) -> dict[str, Series]:
    """Draw the run's panels into the PNG `output` (written whole or not at all); returns the points each
    panel's curves hold, read back from the figure: {panel: {tag: [(step, value), ...]}}."""
    scalars = read_scalars(logdir)
    plotted = {panel: {tag: scalars[tag] for tag in matching(patterns, scalars)} for panel, patterns in PANELS.items()}
    if not any(plotted.values()):
        raise AuditError(logdir, f"holds no series the report draws: no scalar tag matches "
                                 f"{', '.join(pattern for patterns in PANELS.values() for pattern in patterns)}")
    if output.suffix.lower() != ".png":
        raise AuditError(output, "the report is a PNG: give a file name ending in .png")
    if not output.parent.is_dir():
        raise AuditError(output, f"the directory {output.parent} does not exist")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, 3, figsize=(15, 7), constrained_layout=True)
    axes = list(grid.flat)[:len(PANELS)]
    for spare in list(grid.flat)[len(PANELS):]:
        spare.set_axis_off()
    for axis, (panel, series) in zip(axes, plotted.items()):
        axis.set_title(panel)
        axis.set_xlabel("step")
        for tag, points in series.items():
            steps, values = zip(*points)
            axis.plot(steps, values, marker="." if len(points) < 30 else None, label=tag)
        if series:
            axis.legend(fontsize="small")
            if panel in _LOG_SCALE:
                _spread_scale(axis, [v for points in series.values() for _, v in points])
        else:
            axis.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=axis.transAxes)
    figure.suptitle(str(logdir))
    drawn = {axis.get_title(): {line.get_label(): [(int(x), float(y)) for x, y in line.get_xydata()]
                                for line in axis.get_lines()} for axis in axes}
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=output.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=100)
        os.replace(temporary, output)  # a reader never sees half a file
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)
    return drawn


def _spread_scale(axis: "Axes", values: list[float]) -> None:
    """A log axis for series orders of magnitude apart; symmetric-log when some are 0 or negative (a negative
    gap beside a bound of 1e6 would otherwise sit flat on the zero line)."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if all(v > 0 for v in values):
        axis.set_yscale("log")
    elif finite:
        # linear below the smallest magnitude's power of ten: its ticks then stand a decade apart from 0's
        axis.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(min(finite))))

