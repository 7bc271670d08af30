"""Models rebuilt from what training wrote, for the `pathmonitor` audit commands.

Three kinds of files: a Lightning checkpoint (`.ckpt`, one file), a DeepSpeed checkpoint directory as
Lightning's DeepSpeed strategy writes it (consolidated in memory with DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint`), and a plain `state_dict` file. The model's class comes from
`--model package.module:ClassName`, else from the checkpoint's hyper-parameters when LightningCLI wrote
it (their `_class_path`). Pruning masks a `PathBudgetPruning` saved in the checkpoint are applied, and
`torch.nn.utils.prune`'s `weight_orig` / `weight_mask` pairs are folded into `weight`. Every failure is
an `AuditError` naming the file and the problem.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn


class AuditError(Exception):
    """What went wrong, for one line on stderr: `<file>: <problem>`."""

    def __init__(self, path: Optional[Path], problem: str):
        super().__init__(f"{path}: {problem}" if path is not None else problem)


@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with what the checkpoint said about its training."""

    model: nn.Module
    path: Path
    kind: str  # "lightning", "deepspeed" or "state_dict"
    masks_applied: int  # how many weights a PathBudgetPruning mask was applied to
    hyper_parameters: Mapping[str, Any]


def load_model(path: Path, model_spec: Optional[str] = None, like: Optional[Loaded] = None) -> Loaded:
    """The model a checkpoint holds, in eval mode on the CPU, its weights in float32 or wider. A checkpoint
    without hyper-parameters (a bare state_dict) is built with those of `like`, another loaded checkpoint."""
    if not path.exists():
        raise AuditError(path, "no such file or directory")
    if path.is_dir():
        state, meta, kind = _read_deepspeed(path), _deepspeed_client_state(path), "deepspeed"
    else:
        loaded = _torch_load(path)
        if isinstance(loaded, Mapping) and "state_dict" in loaded:
            state, meta, kind = loaded["state_dict"], loaded, "lightning"
        elif isinstance(loaded, Mapping) and loaded and all(isinstance(v, Tensor) for v in loaded.values()):
            state, meta, kind = loaded, {}, "state_dict"
        else:
            raise AuditError(path, "not a checkpoint: neither a Lightning checkpoint (no 'state_dict') nor a "
                                   "state_dict of tensors")
    hyper_parameters = meta.get("hyper_parameters") or (like.hyper_parameters if like is not None else {})
    model = _instantiate(path, model_spec, hyper_parameters)
    state = _fold_prune_pairs(dict(state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        problems = " ".join(str(error).split()).replace(f"Error(s) in loading state_dict for {type(model).__name__}: ",
                                                         "")
        raise AuditError(path, f"does not fit {type(model).__name__}: {problems[:400]}") from None
    applied = _apply_pruning_masks(path, model, meta.get("callbacks") or {})
    return Loaded(model.float().eval(), path, kind, applied, dict(hyper_parameters))


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Library chatter (DeepSpeed's prints and logs) kept off stdout and stderr."""
    buffer = io.StringIO()
    deepspeed_logger = logging.getLogger("DeepSpeed")
    level = deepspeed_logger.level
    deepspeed_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        deepspeed_logger.setLevel(level)


def _torch_load(path: Path) -> Any:
    try:
        with quiet():
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many kinds for a damaged file; all mean the same here
        raise AuditError(path, f"cannot be read as a PyTorch file ({type(error).__name__}: {_first_line(error)}); "
                               f"truncated or corrupted?") from None


def _deepspeed_files(path: Path) -> Path:
    """The directory holding the model-state files of the checkpoint's latest tag."""
    latest = path / "latest"
    if not latest.is_file():
        raise AuditError(path, "a directory, but not a DeepSpeed checkpoint (no 'latest' file)")
    tag_dir = path / latest.read_text().strip()
    if not tag_dir.is_dir() or not any(tag_dir.glob("*model_states.pt")):
        raise AuditError(path, f"a DeepSpeed checkpoint whose tag directory {tag_dir.name!r} holds no model states")
    return tag_dir


def _read_deepspeed(path: Path) -> Mapping[str, Tensor]:
    _deepspeed_files(path)
    try:
        with quiet():  # importing DeepSpeed logs its accelerator choice
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise AuditError(path, "a DeepSpeed checkpoint, and DeepSpeed is not installed") from None
    try:
        with quiet():
            return get_fp32_state_dict_from_zero_checkpoint(str(path))
    except Exception as error:  # DeepSpeed's consolidation asserts and raises freely on damaged files
        raise AuditError(path, f"DeepSpeed could not consolidate it ({type(error).__name__}: "
                               f"{_first_line(error)})") from None


def _deepspeed_client_state(path: Path) -> Mapping[str, Any]:
    """What Lightning stored beside DeepSpeed's state: hyper-parameters, callback states (rank 0's file)."""
    tag_dir = _deepspeed_files(path)
    candidates = sorted(tag_dir.glob("*rank_0*model_states.pt")) or sorted(tag_dir.glob("*model_states.pt"))
    loaded = _torch_load(candidates[0])
    return loaded if isinstance(loaded, Mapping) else {}


def _instantiate(path: Path, spec: Optional[str], hyper_parameters: Optional[Mapping[str, Any]]) -> nn.Module:
    hyper_parameters = dict(hyper_parameters or {})
    class_path = hyper_parameters.pop("_class_path", None)
    hyper_parameters.pop("_instantiator", None)
    if spec is None and class_path is None:
        raise AuditError(path, "the checkpoint does not name its model's class: pass --model package.module:ClassName")
    cls = _import_class(path, spec) if spec is not None else _import_class(path, class_path, separator=".")
    arguments = {k: v for k, v in hyper_parameters.items() if not k.startswith("_")}
    try:
        accepted = inspect.signature(cls).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        model = cls(**{k: v for k, v in arguments.items() if takes_any or k in accepted})
    except Exception as error:
        raise AuditError(path, f"cannot build {cls.__name__} from the checkpoint's hyper-parameters "
                               f"{arguments}: {_first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise AuditError(path, f"{cls.__name__} is not a torch.nn.Module")
    return model


def _import_class(path: Path, spec: str, separator: str = ":") -> type:
    module_name, _, name = spec.rpartition(separator if separator in spec else ".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise AuditError(path, f"cannot import the model class {spec!r} (expected package.module:ClassName)") from None
    if not isinstance(found, type):
        raise AuditError(path, f"{spec!r} is not a class")
    return found


def _fold_prune_pairs(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`x_orig` and `x_mask` (torch.nn.utils.prune) become `x = x_orig * x_mask`."""
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[:-len("_orig")]
        if f"{base}_mask" in state:
            state[base] = state.pop(key) * state.pop(f"{base}_mask")
    return state


def _apply_pruning_masks(path: Path, model: nn.Module, callbacks: Mapping[str, Any]) -> int:
    applied = 0
    for key, state in callbacks.items():
        if not (isinstance(key, str) and key.startswith("PathBudgetPruning") and isinstance(state, Mapping)):
            continue
        prefix = _state_key_module(key)
        for name, mask in (state.get("masks") or {}).items():
            qualified = ".".join(part for part in (prefix, name) if part)
            try:
                weight = model.get_submodule(qualified).weight
            except AttributeError:
                raise AuditError(path, f"its pruning masks name a module {qualified!r} the model does not have") \
                    from None
            if tuple(mask.shape) != tuple(weight.shape):
                raise AuditError(path, f"its pruning mask for {qualified} has shape {tuple(mask.shape)}, the weight "
                                       f"{tuple(weight.shape)}")
            with torch.no_grad():
                weight.mul_(mask.to(weight.device, torch.bool))
            applied += 1
    return applied


def _state_key_module(key: str) -> Optional[str]:
    """The `module` a callback's state key records: `PathBudgetPruning{'scope': ..., 'module': 'net'}`."""
    try:
        fields = ast.literal_eval(key[key.index("{"):])
    except (ValueError, SyntaxError):
        return None
    return fields.get("module") if isinstance(fields, dict) else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
