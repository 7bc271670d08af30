"""`pathmonitor norm | drift | scores | bound | quantize | report`: the quantities of checkpoints after the
fact, and a figure of a run's TensorBoard logs.

Each subcommand prints a short table, or with `--json` one JSON object on stdout (numbers at full float64
precision; a value beyond float64 is null beside its exact log10). Bad input ends with one line on stderr,
`pathmonitor <command>: <file>: <problem>`, and exit code 2, before anything is written (`--debug` shows
the traceback instead). A progress bar on stderr follows the computation once the inputs have loaded.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import pathmonitor as pm
from pathmonitor.logmath import exp_or_inf
from pathmonitor.norms import validated_input_shape

from .checkpoints import AuditError, Loaded, load_model

COMMANDS = ("norm", "drift", "scores", "bound", "quantize", "report")


def main(argv: Sequence[str]) -> int:
    """Run one subcommand; the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with torch.no_grad():  # scores enable autograd for their own backward pass
            result = args.run(args)
    except AuditError as error:
        if args.debug:
            raise
        print(f"pathmonitor {args.command}: {error}", file=sys.stderr)
        return 2
    except (pm.UnsupportedModelError, pm.PathComputationError, ValueError) as error:
        if args.debug:
            raise
        where = getattr(args, "checkpoint", None) or getattr(args, "new", None) or getattr(args, "logdir", None)
        text = " ".join(str(error).split())
        print(f"pathmonitor {args.command}: {where}: {text}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(_as_text(result))
    return 0


# -- the subcommands -------------------------------------------------------------------------------------
def norm(args: argparse.Namespace) -> dict:
    """||Phi(theta)||_q for each --q (MATH.md section 2)."""
    loaded = load_model(args.checkpoint, args.model)
    shape = input_shape(loaded, args.input_shape)
    norms = {}
    for q in _progress(args.q, "path-norms"):
        log_value = float(pm.log_path_norm(loaded.model, shape, q))
        norms[f"l{_tag(q)}"] = _finite_or_none(exp_or_inf(log_value))
        norms[f"log10_l{_tag(q)}"] = log_value / math.log(10)
    return {"command": "norm", **_describe(loaded, shape), "norms": norms}


def drift(args: argparse.Namespace) -> dict:
    """pm.path_metric(NEW, OLD): the current weights first, the reference second (MATH.md section 3)."""
    new = load_model(args.new, args.model)
    old = load_model(args.old, args.model, like=new)  # a bare state_dict is read into the architecture of NEW
    shape = input_shape(new, args.input_shape)
    for _ in _progress([0], "path-metric"):
        metric = pm.path_metric(new.model, old.model, shape)
    result = {"command": "drift", "old": str(old.path), "new": str(new.path), "input_shape": list(shape),
              "value": _finite_or_none(metric.value), "log10_value": _log10(metric.log_value),
              "relative": _finite_or_none(metric.relative), "exact": metric.exact, "kind": metric.kind}
    if args.input_bound is not None:
        result["input_bound"] = args.input_bound
        result["certified_change"] = _finite_or_none(max(args.input_bound, 1.0) * metric.value)
    return result


def scores(args: argparse.Namespace) -> dict:
    """Per layer: sparsity and the share of path mass crossing it (the sum of its relative path-magnitude
    scores); the surviving weights carrying the least and the most path mass (MATH.md section 4)."""
    loaded = load_model(args.checkpoint, args.model)
    shape = input_shape(loaded, args.input_shape)
    for _ in _progress([0], "scores"):
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


def bound(args: argparse.Namespace) -> dict:
    """The generalization bound with its constants (MATH.md section 5)."""
    loaded = load_model(args.checkpoint, args.model)
    shape = input_shape(loaded, args.input_shape)
    for _ in _progress([0], "bound"):
        found = pm.generalization_bound(loaded.model, shape, n_samples=args.n_samples, input_bound=args.input_bound,
                                        sharpened=args.sharpened)
    constants = {key: getattr(found, key) for key in ("first_part", "depth", "max_pool_kernel", "max_pool_kinds",
                                                       "max_pools_per_path", "d_in", "d_out", "sharpened")}
    return {"command": "bound", **_describe(loaded, shape), "n_samples": args.n_samples,
            "input_bound": args.input_bound, "value": _finite_or_none(found.value),
            "log10_value": _log10(found.log_value), "path_norm": _finite_or_none(found.path_norm), **constants}


def quantize(args: argparse.Namespace) -> dict:
    """The certificate for quantizing the checkpoint's weights: a path-metric bound (MATH.md section 3)."""
    loaded = load_model(args.checkpoint, args.model)
    shape = input_shape(loaded, args.input_shape)
    for _ in _progress([0], args.dtype):
        metric = pm.quantization_bound(loaded.model, args.dtype, shape)
    return {"command": "quantize", **_describe(loaded, shape), "dtype": args.dtype,
            "value": _finite_or_none(metric.value), "log10_value": _log10(metric.log_value),
            "relative": _finite_or_none(metric.relative), "exact": metric.exact, "kind": metric.kind}


def report(args: argparse.Namespace) -> dict:
    """A figure of a run's logged path-norm, drift, bound and gap, and sparsity."""
    from .report import write_report

    series = write_report(args.logdir, args.output)
    return {"command": "report", "logdir": str(args.logdir), "output": str(args.output),
            "series": {tag: len(points) for panel in series.values() for tag, points in panel.items()}}


# -- shared pieces ---------------------------------------------------------------------------------------
def input_shape(loaded: Loaded, given: Optional[Sequence[int]]) -> tuple[int, ...]:
    """--input-shape, else the model's example_input_array without its batch dimension."""
    if given:
        return validated_input_shape(given)
    example = getattr(loaded.model, "example_input_array", None)
    if isinstance(example, torch.Tensor) and example.dim() >= 2:
        return tuple(example.shape[1:])
    raise AuditError(loaded.path, f"{type(loaded.model).__name__} has no example_input_array: pass --input-shape "
                                  f"C H W (one input, without the batch dimension)")


def _describe(loaded: Loaded, shape: tuple[int, ...]) -> dict:
    return {"checkpoint": str(loaded.path), "checkpoint_kind": loaded.kind, "model": type(loaded.model).__name__,
            "input_shape": list(shape), "pruning_masks_applied": loaded.masks_applied}


def _progress(items: Sequence, label: str):
    from tqdm import tqdm

    return tqdm(items, desc=label, file=sys.stderr, disable=None, leave=False)


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def _log10(log_value: float) -> Optional[float]:
    return _finite_or_none(log_value / math.log(10)) if log_value != -math.inf else None


def _tag(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else f"{q:g}"


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathmonitor", description="Path-norm audits of checkpoints and runs.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], dict], text: str,
                checkpoints: Sequence[str] = ("checkpoint",)) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        for argument in checkpoints:
            sub.add_argument(argument, type=Path, help="a Lightning .ckpt, a DeepSpeed checkpoint directory or a "
                                                       "state_dict file")
        sub.add_argument("--model", help="package.module:ClassName of the model (default: the class LightningCLI "
                                         "recorded in the checkpoint)")
        sub.add_argument("--input-shape", type=int, nargs="+", metavar="N",
                         help="one input's shape without the batch dimension (default: the model's "
                              "example_input_array)")
        _common(sub)
        sub.set_defaults(run=run)
        return sub

    command("norm", norm, "the path-norms of a checkpoint").add_argument(
        "--q", type=float, nargs="+", default=[1.0], help="exponents (default: 1)")
    command("drift", drift, "the path-metric between two checkpoints: how far the function can have moved",
            checkpoints=("old", "new")).add_argument(
        "--input-bound", type=float, help="B >= max ||x||_inf of the inputs: adds the certified function change")
    command("scores", scores, "per layer, sparsity and share of path mass; the weights with the least and most"
            ).add_argument("--top", type=int, default=20, help="how many weights to list at each end (default 20)")
    sub = command("bound", bound, "the generalization bound of a checkpoint, with its constants")
    sub.add_argument("--n-samples", type=int, required=True, help="training-set size n")
    sub.add_argument("--input-bound", type=float, required=True, help="B >= max ||x||_inf of the inputs")
    sub.add_argument("--sharpened", action="store_true", help="the sharpened constants of MATH.md section 5")
    command("quantize", quantize, "the certificate for quantizing a checkpoint's weights").add_argument(
        "--dtype", choices=("bf16", "fp16", "int8"), required=True)
    sub = commands.add_parser("report", help="a figure of a run's path-norm, drift, bound vs gap and sparsity",
                              description="a figure of a run's path-norm, drift, bound vs gap and sparsity, read "
                                          "from the TensorBoard event files the callbacks wrote")
    sub.add_argument("logdir", type=Path, help="the run's log directory (e.g. runs/digits/version_0)")
    sub.add_argument("-o", "--output", type=Path, default=Path("report.png"), help="the PNG to write")
    _common(sub)
    sub.set_defaults(run=report)
    return parser


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="one JSON object on stdout")
    sub.add_argument("--debug", action="store_true", help="a traceback instead of the one-line error")

