"""`pathmonitor norm | drift | scores | bound | quantize | report`: the quantities of checkpoints after the
fact, and a figure of a run's TensorBoard logs.

Each subcommand prints a short table, or with `--json` one JSON object on stdout (numbers at full float64
precision; a value beyond float64 is null beside its exact log10). Bad input ends with one line on stderr,
`pathmonitor <command>: <file>: <problem>`, and exit code 2, before anything is written (`--debug` shows
the traceback instead). A progress bar on stderr (a terminal only) follows the steps and is erased before
an error line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

import pathmonitor as pm
from pathmonitor.graph import capture
from pathmonitor.metrics import certified_change, metric_and_norm, parameter_source
from pathmonitor.norms import norm_and_log, validated_input_shape
from pathmonitor.sources import ModuleSource

from .values import example_input_shape, exponent_tag, log10
from .checkpoints import AuditError, Loaded, load_model

COMMANDS = ("norm", "drift", "scores", "bound", "quantize", "report")


def main(argv: Sequence[str]) -> int:
    """Run one subcommand; the process exit code."""
    args = _parser().parse_args(argv)
    progress = Progress(args.command, _steps(args))
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")  # nothing on stderr but the bar, or the one error line
            with torch.no_grad():  # scores enable autograd for their own backward pass
                result = args.run(args, progress)
            output = json.dumps(result, allow_nan=False) if args.json else _as_text(result)
    except KeyboardInterrupt:
        progress.close()
        print(f"pathmonitor {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        progress.close()
        if args.debug:
            raise
        problem = str(error) if isinstance(error, AuditError) else str(AuditError(
            progress.where, f"{type(error).__name__}: {error}"))
        print(f"pathmonitor {args.command}: {problem}", file=sys.stderr)
        return 2
    progress.close()
    print(output)
    return 0


class Progress:
    """A bar on stderr over a subcommand's steps (shown when stderr is a terminal, erased when done or
    failed), and the file the current step works on, for an error line."""

    def __init__(self, command: str, steps: int):
        from tqdm import tqdm

        self.bar = tqdm(total=steps, desc=f"pathmonitor {command}", file=sys.stderr, disable=None, leave=False)
        self.where: Optional[Path] = None

    @contextlib.contextmanager
    def step(self, label: str, where: Optional[Path] = None) -> Iterator[None]:
        self.where = where if where is not None else self.where
        self.bar.set_postfix_str(label, refresh=True)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _steps(args: argparse.Namespace) -> int:
    return {"norm": 1 + len(getattr(args, "q", [])), "drift": 4, "report": 1}.get(args.command, 2)


# -- the subcommands -------------------------------------------------------------------------------------
def norm(args: argparse.Namespace, progress: Progress) -> dict:
    """||Phi(theta)||_q for each --q (MATH.md section 2)."""
    loaded, shape = _load(args.checkpoint, args, progress)
    graph, norms = capture(loaded.model, shape), {}
    for q in args.q:
        with progress.step(f"L{exponent_tag(q)} path-norm"):
            value, log_value = norm_and_log(graph, loaded.model, ModuleSource(loaded.model), q)
        norms[f"l{exponent_tag(q)}"] = _finite_or_none(value)
        norms[f"log10_l{exponent_tag(q)}"] = _log10(log_value)
    return {"command": "norm", **_describe(loaded, shape), "norms": norms}


def drift(args: argparse.Namespace, progress: Progress) -> dict:
    """pm.path_metric(NEW, OLD): the current weights first, the reference second (MATH.md section 3)."""
    new, shape = _load(args.new, args, progress)
    graph, source = capture(new.model, shape), ModuleSource(new.model)
    # NEW alone first, so that its own problems (NaN weights, an input shape it does not take) name NEW, not OLD
    with progress.step(f"L1 path-norm of {args.new.name}", args.new):
        norm_new = norm_and_log(graph, new.model, source, 1.0)
    with progress.step(f"reading {args.old.name}", args.old):
        old = load_model(args.old, args.model, like=new)  # a bare state_dict is read into NEW's architecture
    with progress.step("path-metric", args.old):  # what can fail now is OLD: its values, its fit to NEW's architecture
        metric, _ = metric_and_norm(graph, new.model, source, parameter_source(old.model, new.model, graph), norm_new)
    result = {"command": "drift", "old": str(old.path), "new": str(new.path), "input_shape": list(shape),
              "value": _finite_or_none(metric.value), "log10_value": _log10(metric.log_value),
              "relative": _finite_or_none(metric.relative), "exact": metric.exact, "kind": metric.kind}
    if args.input_bound is not None:
        result["input_bound"] = args.input_bound
        result["certified_change"] = _finite_or_none(certified_change(metric, args.input_bound))
    return result


def scores(args: argparse.Namespace, progress: Progress) -> dict:
    """Per layer: sparsity and the share of path mass crossing it (the sum of its relative path-magnitude
    scores); the surviving weights carrying the least and the most path mass (MATH.md section 4)."""
    loaded, shape = _load(args.checkpoint, args, progress)
    with progress.step("path-magnitude scores"):
        relative = pm.path_magnitude_scores(loaded.model, shape, relative=True)
    parameters = dict(loaded.model.named_parameters())
    layers, names, flat_scores, flat_layers, flat_indices = [], list(relative), [], [], []
    for position, name in enumerate(names):
        weight, score = parameters[name].detach(), relative[name]
        alive = (weight != 0).reshape(-1)
        layers.append({"weight": name, "entries": weight.numel(), "sparsity": int((~alive).sum()) / weight.numel(),
                       "path_mass_share": float(score.sum())})
        indices = alive.nonzero().flatten()  # pruned entries carry no path mass and are not listed
        flat_scores.append(score.reshape(-1)[indices])
        flat_layers.append(torch.full_like(indices, position))
        flat_indices.append(indices)
    all_scores, all_layers, all_indices = torch.cat(flat_scores), torch.cat(flat_layers), torch.cat(flat_indices)

    def listed(largest: bool) -> list[dict]:
        chosen = torch.topk(all_scores, min(args.top, all_scores.numel()), largest=largest).indices
        entries = []
        for k in chosen:
            name = names[int(all_layers[k])]
            index = [int(i) for i in torch.unravel_index(all_indices[k], parameters[name].shape)]
            entries.append({"weight": name, "index": index, "score_relative": float(all_scores[k])})
        return entries

    return {"command": "scores", **_describe(loaded, shape), "layers": layers, "least": listed(False),
            "most": listed(True)}


def bound(args: argparse.Namespace, progress: Progress) -> dict:
    """The generalization bound with its constants (MATH.md section 5)."""
    loaded, shape = _load(args.checkpoint, args, progress)
    with progress.step("bound"):
        found = pm.generalization_bound(loaded.model, shape, n_samples=args.n_samples, input_bound=args.input_bound,
                                        sharpened=args.sharpened)
    constants = {key: getattr(found, key) for key in ("first_part", "depth", "max_pool_kernel", "max_pool_kinds",
                                                       "max_pools_per_path", "d_in", "d_out", "sharpened")}
    return {"command": "bound", **_describe(loaded, shape), "n_samples": args.n_samples,
            "input_bound": args.input_bound, "value": _finite_or_none(found.value),
            "log10_value": _log10(found.log_value), "path_norm": _finite_or_none(found.path_norm), **constants}


def quantize(args: argparse.Namespace, progress: Progress) -> dict:
    """The certificate for quantizing the checkpoint's weights: a path-metric bound (MATH.md section 3)."""
    loaded, shape = _load(args.checkpoint, args, progress)
    with progress.step(f"{args.dtype} certificate"):
        metric = pm.quantization_bound(loaded.model, args.dtype, shape)
    return {"command": "quantize", **_describe(loaded, shape), "dtype": args.dtype,
            "value": _finite_or_none(metric.value), "log10_value": _log10(metric.log_value),
            "relative": _finite_or_none(metric.relative), "exact": metric.exact, "kind": metric.kind}


def report(args: argparse.Namespace, progress: Progress) -> dict:
    """A figure of a run's logged path-norm, drift, bound and gap, sparsity and regularizer penalty."""
    from .report import write_report

    if args.output.is_dir():
        raise AuditError(args.output, "is a directory: give the path of the PNG to write")
    with progress.step("drawing", args.logdir):
        series = write_report(args.logdir, args.output)
    return {"command": "report", "logdir": str(args.logdir), "output": str(args.output),
            "series": {tag: len(points) for panel in series.values() for tag, points in panel.items()}}


# -- shared pieces ---------------------------------------------------------------------------------------
def _load(path: Path, args: argparse.Namespace, progress: Progress) -> tuple[Loaded, tuple[int, ...]]:
    """The checkpoint's model and the input shape: --input-shape, else its example_input_array's."""
    with progress.step(f"reading {path.name}", path):
        loaded = load_model(path, args.model)
    if args.input_shape:
        return loaded, validated_input_shape(args.input_shape)
    try:
        return loaded, example_input_shape(loaded.model)
    except ValueError as problem:
        raise AuditError(path, f"{problem}: pass --input-shape C H W (one input, without the batch dimension)") \
            from None


def _describe(loaded: Loaded, shape: tuple[int, ...]) -> dict:
    return {"checkpoint": str(loaded.path), "checkpoint_kind": loaded.kind, "model": type(loaded.model).__name__,
            "input_shape": list(shape), "pruning_masks_applied": loaded.masks_applied}


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def _log10(log_value: float) -> Optional[float]:
    return _finite_or_none(log10(log_value)) if log_value != -math.inf else None


def _as_text(result: dict) -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{key}:")
            lines += ["  " + "  ".join(f"{k}={_short(v)}" for k, v in item.items()) for item in value]
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k:<28} {_short(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key:<30} {_short(value)}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end like bad input: one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _at_least(minimum: float, *, integer: bool = False, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number (an integer) >= `minimum` (> with `strict`), checked before any file
    is read; argparse names it in "invalid integer value: 'abc'"."""
    kind, relation = ("an integer" if integer else "a finite number"), (">" if strict else ">=")

    def convert(text: str) -> float:
        value = int(text) if integer else float(text)  # a ValueError: argparse's "invalid <name> value"
        if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
            raise argparse.ArgumentTypeError(f"must be {kind} {relation} {minimum:g}, got {text}")
        return value

    convert.__name__ = "integer" if integer else "number"
    return convert


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="pathmonitor", description="Path-norm audits of checkpoints and runs.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], dict], text: str,
                checkpoints: Sequence[str] = ("checkpoint",)) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        for argument in checkpoints:
            sub.add_argument(argument, type=Path, help="a Lightning .ckpt, a DeepSpeed checkpoint directory or a "
                                                       "state_dict file")
        sub.add_argument("--model", help="package.module:ClassName of the model, or package.module:function returning "
                                         "it (default: the class LightningCLI recorded in the checkpoint)")
        sub.add_argument("--input-shape", type=_at_least(1, integer=True), nargs="+", metavar="N",
                         help="one input's shape without the batch dimension (default: the model's "
                              "example_input_array)")
        _common(sub)
        sub.set_defaults(run=run)
        return sub

    command("norm", norm, "the path-norms of a checkpoint").add_argument(
        "--q", type=_at_least(1), nargs="+", default=[1.0], help="exponents, each >= 1 (default: 1)")
    command("drift", drift, "the path-metric between two checkpoints: how far the function can have moved",
            checkpoints=("old", "new")).add_argument(
        "--input-bound", type=_at_least(0), help="B >= max ||x||_inf of the inputs: adds the certified function "
                                                 "change")
    command("scores", scores, "per layer, sparsity and share of path mass; the weights with the least and most"
            ).add_argument("--top", type=_at_least(0, integer=True), default=20,
                           help="how many weights to list at each end (default 20)")
    sub = command("bound", bound, "the generalization bound of a checkpoint, with its constants")
    sub.add_argument("--n-samples", type=_at_least(1, integer=True), required=True, help="training-set size n")
    sub.add_argument("--input-bound", type=_at_least(0, strict=True), required=True,
                     help="B >= max ||x||_inf of the inputs, > 0")
    sub.add_argument("--sharpened", action="store_true", help="the sharpened constants of MATH.md section 5")
    command("quantize", quantize, "the certificate for quantizing a checkpoint's weights").add_argument(
        "--dtype", choices=("bf16", "fp16", "int8"), required=True)
    text = "a figure of a run's path-norm, drift, bound vs gap, sparsity and regularizer penalty"
    sub = commands.add_parser("report", help=text,
                              description=f"{text}, read from the TensorBoard event files the callbacks wrote")
    sub.add_argument("logdir", type=Path, help="the run's log directory (e.g. runs/digits/version_0)")
    sub.add_argument("-o", "--output", type=Path, default=Path("report.png"), help="the PNG to write")
    _common(sub)
    sub.set_defaults(run=report)
    return parser


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="one JSON object on stdout")
    sub.add_argument("--debug", action="store_true", help="a traceback instead of the one-line error")

