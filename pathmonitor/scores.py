"""Path-magnitude pruning scores (MATH.md section 4).

score_i = |theta_i| * d||Phi(theta)||_1 / d|theta_i| = ||Phi(theta)||_1 - ||Phi(theta with theta_i = 0)||_1,
the path-metric of pruning theta_i alone; exact for shared conv weights, since every path crosses a
layer at most once and ||Phi||_1 is multilinear in the weights. Invariant under neuron-wise rescaling.
"""
from __future__ import annotations

import warnings
import math
from collections import Counter
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .engine import log_total
from .graph import OpKind, PathGraph, capture, longest_path
from .layers import BATCH_NORMS, parameter_name, tensor_holders
from .logmath import exceeds_float64, exp_or_inf
from .norms import PathNormOverflowWarning, unwrapped, validated_input_shape
from .sources import ModuleSource, ParameterEdges, ParameterSource, ScoringMagnitudes


def prunable_weights(graph: PathGraph, model: nn.Module) -> dict[str, str]:
    """{qualified weight name: module name} for every Linear / Conv / ConvTranspose the graph evaluates."""
    return {parameter_name(module_name, "weight"): module_name for module_name in dict.fromkeys(graph.affine_modules())
            if not isinstance(model.get_submodule(module_name), BATCH_NORMS)}


def selected_modules(graph: PathGraph, model: nn.Module, parameters: Optional[Iterable[str]]) -> list[str]:
    """The modules of the named weights (default: every prunable weight), checked to be scorable."""
    allowed = prunable_weights(graph, model)
    if parameters is None:
        chosen = list(allowed)
    else:
        chosen = list(dict.fromkeys([parameters] if isinstance(parameters, str) else parameters))
        unknown = [name for name in chosen if name not in allowed]
        if unknown:
            raise ValueError(f"cannot score {unknown}: path-magnitude scores exist for the weights of Linear / Conv / "
                             f"ConvTranspose layers on the input-output paths, e.g. {list(allowed)[:3]}")
    modules = [allowed[name] for name in chosen]
    check_scorable(graph, model, modules)
    return modules


def check_scorable(graph: PathGraph, model: nn.Module, modules: list[str]) -> None:
    """Raise ValueError unless per-module scores and masks of these modules' weights are exact."""
    _check_single_crossing(graph, modules)
    check_untied(model, modules)


def _check_single_crossing(graph: PathGraph, modules: list[str]) -> None:
    """Scores are exact only when no path crosses a scored module twice (||Phi||_1 multilinear)."""
    calls = Counter(graph.affine_modules())
    for name in modules:
        if calls[name] > 1 and longest_path(graph, lambda op: int(op.kind is OpKind.AFFINE and op.target == name)) > 1:
            raise ValueError(f"module {name!r} is applied twice on one input-output path, so ||Phi||_1 is not "
                             f"linear in its weights and path-magnitude scores would be wrong; leave it out of "
                             f"`parameters`")


def check_untied(model: nn.Module, modules: list[str]) -> None:
    """Scores and masks are per module: a weight tensor two modules of `model` hold (tied, say to an
    embedding) would be scored per use, each use seeing the others unpruned, while zeroing an entry zeroes
    it in every use."""
    holders = tensor_holders(model)
    for name in modules:
        weight = model.get_submodule(name)._parameters.get("weight")
        shared = [] if weight is None else holders.get(id(weight), [])
        if len(shared) > 1:
            raise ValueError(f"parameters {shared} are one tensor (tied weights): path-magnitude scores and pruning "
                             f"masks are per module, and would miss what the other uses carry; select none of them")


def scores_from(graph: PathGraph, model: nn.Module, source: ParameterSource,
                modules: list[str]) -> tuple[dict[str, Tensor], float]:
    """Relative scores score_i / ||Phi||_1 of the weights of `modules`, and log ||Phi||_1.

    One forward and one backward pass of the |theta| network."""
    magnitudes = ScoringMagnitudes(ParameterEdges(source), set(modules))
    with torch.enable_grad():
        log_norm = log_total(graph, model, magnitudes, 1.0)
        leaves = [magnitudes.leaves[name] for name in modules]
        if float(log_norm.detach()) == -math.inf:  # no path carries weight: pruning anything changes nothing
            return {parameter_name(name, "weight"): torch.zeros_like(leaf.detach())
                    for name, leaf in zip(modules, leaves)}, -math.inf
        grads = torch.autograd.grad(log_norm, leaves, allow_unused=True)
    relative = {}
    for name, leaf, grad in zip(modules, leaves, grads):
        # in place: the gradient buffers are ours, and fresh weight-sized allocations cost page faults
        relative[parameter_name(name, "weight")] = torch.zeros_like(leaf) if grad is None else grad.mul_(leaf.detach())
    return relative, float(log_norm.detach())


def _require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("path-magnitude scores need one backward pass; call path_magnitude_scores outside "
                           "torch.inference_mode()")


def path_magnitude_scores(model: nn.Module, input_shape: Sequence[int], parameters: Optional[Iterable[str]] = None,
                          *, relative: bool = False) -> dict[str, Tensor]:
    """{qualified weight name: score tensor of the weight's shape}, score_i = ||Phi(theta)||_1 -
    ||Phi(theta with theta_i = 0)||_1 (MATH.md section 4); float64.

    By default every weight of Linear / Conv / ConvTranspose; never biases or batch-norm. Entries that
    are already zero (pruned) score 0. With relative=True the scores are divided by ||Phi(theta)||_1,
    which stays finite for networks whose path-norm exceeds float64."""
    _require_autograd()
    model, shape = unwrapped(model), validated_input_shape(input_shape)
    graph = capture(model, shape)
    modules = selected_modules(graph, model, parameters)
    scores, log_norm = scores_from(graph, model, ModuleSource(model), modules)
    if relative:
        return scores
    if exceeds_float64(log_norm):
        warnings.warn("the L1 path-norm exceeds float64, so absolute scores overflow; use relative=True",
                      PathNormOverflowWarning, stacklevel=2)
    norm = exp_or_inf(log_norm)
    return {name: score.mul_(norm) for name, score in scores.items()}
