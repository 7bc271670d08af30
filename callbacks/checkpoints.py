"""Models rebuilt from what training wrote, for the `pathmonitor` audit commands.

Three kinds of files: a Lightning checkpoint (`.ckpt`, one file), a DeepSpeed checkpoint directory as
Lightning's DeepSpeed strategy writes it (consolidated in memory with DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint`), and a plain `state_dict` file. The model comes from
`--model package.module:ClassName` (or a function returning the model), else from the checkpoint's
hyper-parameters when LightningCLI wrote it (their `_class_path`). Pruning masks a `PathBudgetPruning`
saved in the checkpoint are applied, and `torch.nn.utils.prune`'s `weight_orig` / `weight_mask` pairs are
folded into `weight`. Every failure is an `AuditError` naming the file and the problem.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import logging
import pickle
import reprlib
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from pathmonitor.architecture import wrapped_name


class AuditError(Exception):
    """What went wrong, for one line on stderr: `<file>: <problem>`."""

    def __init__(self, path: Optional[Path], problem: str):
        problem = " ".join(problem.split())  # one line, whatever a library's message held
        super().__init__(f"{path}: {problem}" if path is not None else problem)


@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with what the checkpoint said about its training."""

    model: nn.Module
    path: Path
    kind: str  # "lightning", "deepspeed" or "state_dict"
    masks_applied: int  # how many weights a saved PathBudgetPruning mask pruned entries of
    hyper_parameters: Mapping[str, Any]


def load_model(path: Path, model_spec: Optional[str] = None, like: Optional[Loaded] = None) -> Loaded:
    """The model a checkpoint holds, in eval mode on the CPU, its tensors in the checkpoint's own dtypes. A
    checkpoint without hyper-parameters (a bare state_dict) is built with those of `like`, another one."""
    if not path.exists():
        raise AuditError(path, "no such file or directory")
    if path.is_dir():
        tag_dir = _deepspeed_files(path)
        state, meta, kind = _read_deepspeed(path), _deepspeed_client_state(tag_dir), "deepspeed"
    else:
        loaded = _torch_load(path)
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            state, meta, kind = loaded["state_dict"], loaded, "lightning"
        elif isinstance(loaded, Mapping) and loaded and all(isinstance(v, Tensor) for v in loaded.values()):
            state, meta, kind = loaded, {}, "state_dict"
        else:
            raise AuditError(path, "not a checkpoint: neither a Lightning checkpoint (a 'state_dict' mapping) nor a "
                                   "state_dict of tensors")
    # only a checkpoint that records none takes `like`'s: an empty record means a model built without arguments
    hyper_parameters = meta["hyper_parameters"] if "hyper_parameters" in meta else (
        like.hyper_parameters if like is not None else {})
    if not isinstance(hyper_parameters, Mapping):
        hyper_parameters = vars(hyper_parameters) if hasattr(hyper_parameters, "__dict__") else {}
    model = _instantiate(path, model_spec, hyper_parameters)
    state = _without_wrapper_prefix(_fold_prune_pairs(dict(state)), model)
    try:
        # assign: the checkpoint's tensors as they are, float64 ones included (a copy would cast them)
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        problems = str(error).replace(f"Error(s) in loading state_dict for {type(model).__name__}:", "")
        raise AuditError(path, f"does not fit {type(model).__name__}: {problems.strip()[:400]}") from None
    applied = _apply_pruning_masks(path, model, meta.get("callbacks") or {})
    return Loaded(model.eval(), path, kind, applied, dict(hyper_parameters))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Library chatter (prints, DeepSpeed's logs, warnings) kept off stdout and stderr."""
    deepspeed_logger = logging.getLogger("DeepSpeed")
    level = deepspeed_logger.level
    deepspeed_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        deepspeed_logger.setLevel(level)


class _LightningRenames(pickle.Unpickler):
    """Reads checkpoints pickled by the unified `lightning` package with the standalone packages' classes."""

    RENAMES = (("lightning.pytorch", "pytorch_lightning"), ("lightning.fabric", "lightning_fabric"))

    def find_class(self, module: str, name: str) -> Any:
        for old, new in self.RENAMES:
            if module == old or module.startswith(old + "."):
                module = new + module[len(old):]
        return super().find_class(module, name)


_PICKLE = types.SimpleNamespace(**{k: getattr(pickle, k) for k in ("load", "loads", "dump", "dumps")},
                                Unpickler=_LightningRenames, __name__="pickle")


def _torch_load(path: Path) -> Any:
    from pytorch_lightning.utilities.migration import pl_legacy_patch  # classes older checkpoints pickled

    try:
        with quiet(), pl_legacy_patch():
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    except ModuleNotFoundError as error:
        raise AuditError(path, f"was pickled with classes of the module {error.name!r}, which is not installed") \
            from None
    except Exception as error:  # torch raises many kinds for a damaged file; all mean the same here
        raise AuditError(path, f"cannot be read as a PyTorch file ({type(error).__name__}: {_first_line(error)}); "
                               f"truncated or corrupted?") from None


def _deepspeed_files(path: Path) -> Path:
    """The directory holding the model-state files of the checkpoint's latest tag."""
    latest = path / "latest"
    if not latest.is_file():
        raise AuditError(path, "a directory, but not a DeepSpeed checkpoint (no 'latest' file)")
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise AuditError(latest, f"cannot be read as DeepSpeed's tag file ({type(error).__name__})") from None
    tag_dir = path / tag
    if not tag or not tag_dir.is_dir() or not any(tag_dir.glob("*model_states.pt")):
        raise AuditError(path, f"a DeepSpeed checkpoint whose 'latest' tag {tag!r} names no directory of model "
                               f"states")
    return tag_dir


def _read_deepspeed(path: Path) -> Mapping[str, Tensor]:
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


def _deepspeed_client_state(tag_dir: Path) -> Mapping[str, Any]:
    """What Lightning stored beside DeepSpeed's state: hyper-parameters, callback states (rank 0's file)."""
    candidates = sorted(tag_dir.glob("*rank_0*model_states.pt")) or sorted(tag_dir.glob("*model_states.pt"))
    loaded = _torch_load(candidates[0])
    return loaded if isinstance(loaded, Mapping) else {}


def _instantiate(path: Path, spec: Optional[str], hyper_parameters: Mapping[str, Any]) -> nn.Module:
    """`--model` (else the class LightningCLI recorded) built with every recorded hyper-parameter, nested
    `class_path` / `init_args` ones of a class through LightningCLI's own instantiator when it recorded one."""
    arguments = dict(hyper_parameters)
    class_path, instantiator = arguments.pop("_class_path", None), arguments.pop("_instantiator", None)
    if spec is None and class_path is None:
        raise AuditError(path, "the checkpoint does not name its model's class: pass --model package.module:ClassName")
    build = _import_builder(path, spec, "--model") if spec is not None else _import_builder(
        path, class_path, "the checkpoint's _class_path (pass --model package.module:ClassName to override it)")
    name = getattr(build, "__name__", repr(build))
    try:
        with quiet():
            if instantiator is not None and isinstance(build, type):
                from pytorch_lightning.cli import instantiate_module

                model = instantiate_module(build, arguments)
            else:
                model = build(**arguments)
    except Exception as error:
        raise AuditError(path, f"cannot build {name} from the checkpoint's hyper-parameters "
                               f"{reprlib.repr(arguments)}: {_first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise AuditError(path, f"{name} gives a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_builder(path: Path, spec: str, given_as: str) -> Callable[..., Any]:
    """The class, or the function returning the model, that `spec` (package.module:name) names."""
    module_name, _, name = spec.rpartition(":" if ":" in spec else ".")
    try:
        with quiet():
            found = getattr(importlib.import_module(module_name), name)
    except Exception as error:  # importing user code can raise anything
        raise AuditError(path, f"cannot import the model {spec!r} named by {given_as} "
                               f"({type(error).__name__}: {_first_line(error)})") from None
    if not callable(found):
        raise AuditError(path, f"{spec!r} named by {given_as} is neither a class nor a function returning the model")
    return found


def _fold_prune_pairs(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`x_orig` and `x_mask` (torch.nn.utils.prune) become `x = x_orig * x_mask`."""
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[:-len("_orig")]
        if f"{base}_mask" in state:
            state[base] = state.pop(key) * state.pop(f"{base}_mask")
    return state


def _without_wrapper_prefix(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The state dict without a prefix that every entry carries and no name of the model has (torch.compile's
    `_orig_mod.`, DDP's `module.`, a LightningModule's attribute holding `--model`), when what is left is
    exactly the model's names; otherwise as it is, for the strict load to say what does not fit."""
    expected = set(model.state_dict())
    if not state or set(state) == expected:
        return state
    first = next(iter(state))
    wrapped = wrapped_name(first, expected)
    if wrapped is None:
        return state
    prefix = first[: -len(wrapped)]
    stripped = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return stripped if len(stripped) == len(state) and set(stripped) == expected else state


def _apply_pruning_masks(path: Path, model: nn.Module, callbacks: Mapping[str, Any]) -> int:
    """Apply the masks of every saved PathBudgetPruning (or subclass) state, recognized by its form: a
    `masks` mapping of boolean tensors beside `rounds`."""
    applied = 0
    for key, state in callbacks.items():
        masks = state.get("masks") if isinstance(state, Mapping) and "rounds" in state else None
        if not (isinstance(masks, Mapping) and all(isinstance(m, Tensor) and m.dtype == torch.bool
                                                   for m in masks.values())):
            continue
        prefix = _state_key_module(path, key)
        for name, mask in masks.items():
            qualified = ".".join(part for part in (prefix, name) if part)
            try:
                weight = model.get_submodule(qualified).weight
            except AttributeError:
                raise AuditError(path, f"its pruning masks name a module {qualified!r} the model does not have") \
                    from None
            if tuple(mask.shape) != tuple(weight.shape):
                raise AuditError(path, f"its pruning mask for {qualified} has shape {tuple(mask.shape)}, the weight "
                                       f"{tuple(weight.shape)}")
            if bool(mask.all()):
                continue  # saved before any round (or one that spared this layer): nothing to apply
            with torch.no_grad():
                weight.mul_(mask.to(weight.device, torch.bool))
            applied += 1
    return applied


def state_key_fields(key: Any) -> Optional[dict]:
    """The settings a callback's state key records (`Name{'module': 'net', ...}`), None if it records none."""
    text = str(key)
    try:
        fields = ast.literal_eval(text[text.index("{"):])
    except (ValueError, SyntaxError):
        return None
    return fields if isinstance(fields, dict) else None


def _state_key_module(path: Path, key: Any) -> Optional[str]:
    """The `module` a callback's state key records: `PathBudgetPruning{'module': 'net', ...}`."""
    fields = state_key_fields(key)
    if fields is None:
        raise AuditError(path, f"holds pruning masks under the state key {reprlib.repr(str(key))}, which does not "
                               f"say which module they belong to")
    module = fields.get("module")
    return module if isinstance(module, str) else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
