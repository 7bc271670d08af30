"""Whether two networks share one architecture, so that one's parameters can be read in the other's path
graph (MATH.md section 3: a path-metric compares two parameter vectors of ONE network).

Same tensor shapes are not enough: a padding, a stride or a pooling chosen in `forward` changes the
function and leaves every shape as it was. The signature of a traced network is every call of its
forward with its literal arguments, and the type and settings of every layer it calls.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .errors import ParameterMismatchError
from .layers import AFFINE_TYPES, parameter_name, tensor_names
from .tracer import uncompiled_name

# the identity when the network is evaluated, whatever their rate: a network built with another rate, or with
# none (code that calls dropout only for a positive rate), is the same function
DROPOUT_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                               F.feature_alpha_dropout})
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

# layer settings that leave the evaluated function as it is: batch-norm's momentum (read by training only)
_FUNCTION_NEUTRAL = frozenset({"momentum", "training"})


def signature(graph: fx.Graph, model: nn.Module) -> tuple:
    """What two separately built networks of one architecture have in common in their traces."""
    entries: list[tuple] = []
    results: dict[fx.Node, Any] = {}  # each call's result, by its position among the calls
    for node in graph.nodes:
        if node.op == "get_attr" and not node.users:  # a tensor read for its dtype or shape, say
            continue
        if _is_dropout(node, model):  # left out: its result is its input's
            source = node.args[0] if node.args else node.kwargs.get("input")
            results[node] = results.get(source)
            continue
        entry: tuple = (node.op, _target(node), _described(node.args, results), _described(node.kwargs, results))
        if node.op == "call_module":
            layer = model.get_submodule(node.target)
            entry += (_layer_type(layer), _settings(layer))
        results[node] = ("result of call", len(entries))
        entries.append(entry)
    return tuple(entries)


def _is_dropout(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in DROPOUT_FUNCTIONS
    return node.op == "call_module" and isinstance(model.get_submodule(node.target), DROPOUT_MODULES)


def check_same(model_signature: tuple, other_signature: tuple) -> None:
    """Raises ParameterMismatchError naming the first call where the two networks differ."""
    if model_signature == other_signature:
        return
    for mine, theirs in zip(model_signature, other_signature):
        if mine != theirs:
            raise ParameterMismatchError(f"the other network is another architecture: {_difference(mine, theirs)}")
    longer = "the model" if len(model_signature) > len(other_signature) else "the other network"
    raise ParameterMismatchError(f"the other network is another architecture: {longer} makes more calls in "
                                 f"forward ({len(model_signature)} vs {len(other_signature)})")


def _difference(mine: tuple, theirs: tuple) -> str:
    if mine[:5] == theirs[:5]:  # one layer, called alike: name the settings that differ
        settings, other_settings = dict(mine[5]), dict(theirs[5])
        differing = "; ".join(f"{key} {settings.get(key)!r} in the model, {other_settings.get(key)!r} in the other "
                              f"network" for key in dict.fromkeys([*settings, *other_settings])
                              if settings.get(key) != other_settings.get(key))
        return f"layer {mine[1]!r} ({mine[4]}): {differing}"
    return f"forward calls {_shown(mine)} in the model where the other network calls {_shown(theirs)}"


def check_state_dict_keys(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Refuses entries that no tensor of the model has: a state dict of another architecture (extra layers)."""
    expected = {_plain(key) for key in model.state_dict()}
    # a parametrized layer's entries are under `parametrizations.`; a plain twin's state dict names them as usual
    expected |= {_plain(parameter_name(name, key)) for name, m in model.named_modules()
                 if isinstance(m, AFFINE_TYPES) for key in tensor_names(m)}
    unexpected = [key for key in state_dict if _plain(key) not in expected and not key.endswith("num_batches_tracked")]
    if unexpected:
        shown = ", ".join(repr(key) for key in unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
        wrapped = wrapped_name(unexpected[0], expected)
        hint = prefix_hint(unexpected[:1], wrapped) if wrapped else ": it is of another architecture"
        raise ParameterMismatchError(f"the state dict has {len(unexpected)} entries that no tensor of the model "
                                     f"has ({shown}){hint}")


def wrapped_name(key: str, names: Iterable[str]) -> Optional[str]:
    """The name among `names` that `key` is under a wrapper's prefix, if any: the longest it ends with (the
    wrapper's prefix is the rest of `key`)."""
    return max((name for name in names if key.endswith("." + name)), key=len, default=None)


def prefix_hint(keys: Iterable[str], name: str) -> str:
    """How to read a state dict one of whose `keys` is the model's entry `name` under a wrapper's prefix."""
    prefixed = next((key for key in keys if key.endswith("." + name)), None)
    if prefixed is None:
        return ""
    return (f"; it has {prefixed!r}: strip the prefix {prefixed[: -len(name)]!r} "
            f"(added by a wrapper such as DDP or a LightningModule)")


def _plain(key: str) -> str:
    """The name without torch.compile's `_orig_mod.` and with torch.nn.utils.prune's `weight_orig` and
    `weight_mask` standing for `weight`."""
    return uncompiled_name(key).removesuffix("_orig").removesuffix("_mask")


def _target(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return uncompiled_name(node.target)
    return node.target if isinstance(node.target, str) else _qualified(node.target)


def _qualified(function: Any) -> str:
    name = getattr(function, "__qualname__", None) or type(function).__name__
    if "<locals>" in name:  # a function made by another (torch's boolean dispatch): its own name says more
        name = getattr(function, "__name__", name)
    return f"{getattr(function, '__module__', '')}.{name}"


def _layer_type(layer: nn.Module) -> str:
    """The torch layer a called layer is: parametrizations and FSDP2 give each instance a class of its own."""
    torch_layer = next((cls for cls in type(layer).__mro__ if cls.__module__.startswith("torch.nn.modules.")),
                       type_before_parametrizations(layer))
    return torch_layer.__qualname__


def _settings(layer: nn.Module) -> tuple:
    # tensors held as plain attributes are data (the weight that pruning or weight norm recomputes from
    # other tensors), and `ds_` attributes DeepSpeed's bookkeeping
    return tuple((key, _described(value, {})) for key, value in vars(layer).items()
                 if not key.startswith(("_", "ds_")) and key not in _FUNCTION_NEUTRAL
                 and not isinstance(value, torch.Tensor))


def _described(value: Any, names: Mapping[fx.Node, Any]) -> Any:
    """A comparable stand-in: plain values as they are, results of calls as `names` gives them (by position),
    tensors by shape, floating dtypes alike (a cast changes the precision, not the function), functions by
    qualified name, other objects by type."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, fx.Node):
        return names.get(value)
    if isinstance(value, (tuple, list)):
        return tuple(_described(v, names) for v in value)
    if isinstance(value, dict):
        return tuple((key, _described(v, names)) for key, v in value.items())
    if isinstance(value, slice):
        return ("slice", *(_described(v, names) for v in (value.start, value.stop, value.step)))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, torch.dtype):
        return "floating dtype" if value.is_floating_point else str(value)
    if isinstance(value, (torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if callable(value):
        return _qualified(value)
    return type(value).__qualname__


def _shown(entry: tuple) -> str:
    keywords = f", {dict(entry[3])}" if entry[3] else ""
    text = f"{entry[1]}{entry[2]}{keywords}" + (f" ({entry[4]})" if len(entry) > 4 else "")
    return text if len(text) <= 160 else text[:157] + "..."
