"""One figure of a training run, drawn from the TensorBoard event files the pathmonitor callbacks wrote:
path-norm (log10), path-metric drift, generalization bound against the measured gap, and sparsity."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .checkpoints import AuditError, quiet

Series = dict[str, list[tuple[int, float]]]  # {tag: [(step, value), ...]}

PANELS: dict[str, tuple[str, ...]] = {
    "path-norm (log10)": ("pathnorm/log10_l1", "pathnorm/log10_l2"),
    "path-metric drift": ("pathmetric/drift", "pathmetric_checkpoint/drift"),
    "bound vs gap": ("bound/value", "bound/gap"),
    "sparsity": ("prune/sparsity",),
}
_LOG_SCALE = {"path-metric drift", "bound vs gap"}


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
    plotted = {panel: {tag: scalars[tag] for tag in tags if tag in scalars} for panel, tags in PANELS.items()}
    if not any(plotted.values()):
        raise AuditError(logdir, f"holds none of the tags pathmonitor's callbacks log "
                                 f"({', '.join(tag for tags in PANELS.values() for tag in tags)})")
    if output.suffix.lower() != ".png":
        raise AuditError(output, "the report is a PNG: give a file name ending in .png")
    if not output.parent.is_dir():
        raise AuditError(output, f"the directory {output.parent} does not exist")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for axis, (panel, series) in zip(axes.flat, plotted.items()):
        axis.set_title(panel)
        axis.set_xlabel("step")
        for tag, points in series.items():
            steps, values = zip(*points)
            axis.plot(steps, values, marker="." if len(points) < 30 else None, label=tag)
        if series:
            axis.legend(fontsize="small")
            if panel in _LOG_SCALE and all(v > 0 for points in series.values() for _, v in points):
                axis.set_yscale("log")
        else:
            axis.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=axis.transAxes)
    figure.suptitle(str(logdir))
    drawn = {axis.get_title(): {line.get_label(): [(int(x), float(y)) for x, y in line.get_xydata()]
                                for line in axis.get_lines()} for axis in axes.flat}
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
