"""An oracle for path quantities that shares no code with the engine.

Every layer of a test network is turned into an explicit neuron DAG by probing the layer's own
float64 forward with basis vectors: column j of a layer's matrix is f(e_j) - f(0), its bias is f(0).
For linear maps this is the matrix itself (each entry one edge weight: a conv pair (in, out) meets
exactly one kernel entry); for ReLU it is the identity; for max-pooling it is the window membership
(edges of weight 1), exactly the DAG of MATH.md section 1. Networks are composed from Sequential,
`Add`, `Sub` and `Cat`, which the oracle follows structurally. Path sums are then computed either
by literally enumerating paths or by dynamic programming over the explicit neurons.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class Fn(nn.Module):
    """A parameter-free step written with functional ops, traced through by the engine."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Add(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


class Sub(Add):
    def forward(self, x):
        return self.a(x) - self.b(x)


class Cat(nn.Module):
    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class Heads(nn.Module):
    """A trunk with two heads; returns a tuple and a dict, all of which count as outputs."""

    def __init__(self, trunk: nn.Module, first: nn.Module, second: nn.Module):
        super().__init__()
        self.trunk, self.first, self.second = trunk, first, second

    def forward(self, x):
        h = self.trunk(x)
        return self.first(h), {"second": self.second(h)}


@dataclass
class NeuronDAG:
    """Neurons 0..n-1 in topological order, for one or several networks of one architecture (variants).

    edges[v] = [(u, (w_variant0, w_variant1, ...))], bias[v] = (b_variant0, ...)."""

    inputs: list[int] = field(default_factory=list)
    edges: list[list[tuple[int, tuple[float, ...]]]] = field(default_factory=list)
    bias: list[tuple[float, ...]] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def new(self, bias: tuple[float, ...]) -> int:
        self.edges.append([])
        self.bias.append(bias)
        return len(self.bias) - 1


def _probe(layer: nn.Module, shape: tuple[int, ...]):
    layer = copy.deepcopy(layer).double().eval()
    n = math.prod(shape)
    with torch.no_grad():
        base = layer(torch.zeros((1,) + shape, dtype=torch.float64))
        basis = torch.eye(n, dtype=torch.float64).reshape((n,) + shape)
        columns = torch.cat([layer(basis[j:j + 1]) for j in range(n)]).reshape(n, -1) - base.reshape(1, -1)
    return columns.T, base.reshape(-1), tuple(base.shape[1:])


def _build(nets: list[nn.Module], dag: NeuronDAG, ids: list[int], shape: tuple[int, ...]):
    net, k = nets[0], len(nets)
    if isinstance(net, nn.Sequential):
        for layers in zip(*nets):
            ids, shape = _build(list(layers), dag, ids, shape)
        return ids, shape
    if isinstance(net, Add):  # Sub too: an edge of weight -1
        a, shape_a = _build([n.a for n in nets], dag, ids, shape)
        b, _ = _build([n.b for n in nets], dag, ids, shape)
        sign = -1.0 if isinstance(net, Sub) else 1.0
        out = []
        for u, v in zip(a, b):
            w = dag.new((0.0,) * k)
            dag.edges[w] += [(u, (1.0,) * k), (v, (sign,) * k)]
            out.append(w)
        return out, shape_a
    if isinstance(net, Cat):
        parts = [_build([n.branches[i] for n in nets], dag, ids, shape) for i in range(len(net.branches))]
        out_shape = (sum(s[0] for _, s in parts),) + parts[0][1][1:]
        return [i for part, _ in parts for i in part], out_shape
    probes = [_probe(n, shape) for n in nets]
    matrices = torch.stack([m for m, _, _ in probes], dim=-1)  # (out, in, variants)
    biases = torch.stack([b for _, b, _ in probes], dim=-1)
    out = []
    for row, b in zip(matrices.tolist(), biases.tolist()):
        v = dag.new(tuple(b))
        dag.edges[v] = [(u, tuple(w)) for u, w in zip(ids, row) if any(x != 0.0 for x in w)]
        out.append(v)
    return out, probes[0][2]


def neuron_dag(nets, input_shape: tuple[int, ...]) -> NeuronDAG:
    """The explicit DAG of one network, or of several networks of one architecture, built from
    Sequential / Add / Sub / Cat / Heads and leaf layers."""
    nets = list(nets) if isinstance(nets, (list, tuple)) else [nets]
    dag = NeuronDAG()
    dag.inputs = [dag.new((0.0,) * len(nets)) for _ in range(math.prod(input_shape))]
    if isinstance(nets[0], Heads):
        trunk, shape = _build([n.trunk for n in nets], dag, dag.inputs, input_shape)
        dag.outputs = (_build([n.first for n in nets], dag, trunk, shape)[0]
                       + _build([n.second for n in nets], dag, trunk, shape)[0])
    else:
        dag.outputs = _build(nets, dag, dag.inputs, input_shape)[0]
    return dag


def path_sum(dag: NeuronDAG, q: float, variant: int = 0) -> float:
    """sum over paths p of |Phi_p|^q, by dynamic programming over neurons (sum over paths ending at v)."""
    into = [0.0] * len(dag.bias)
    inputs = set(dag.inputs)
    for v in range(len(dag.bias)):
        start = 1.0 if v in inputs else abs(dag.bias[v][variant]) ** q
        into[v] = start + sum(abs(w[variant]) ** q * into[u] for u, w in dag.edges[v])
    return sum(into[v] for v in dag.outputs)


def _paths(dag: NeuronDAG):
    """Every path, as the tuple over variants of its product of weights (times the starting bias)."""
    inputs = set(dag.inputs)

    def walk_back(v: int, product: tuple[float, ...]):
        if v in inputs:
            yield product
            return
        if any(b != 0.0 for b in dag.bias[v]):
            yield tuple(p * b for p, b in zip(product, dag.bias[v]))
        for u, w in dag.edges[v]:
            yield from walk_back(u, tuple(p * x for p, x in zip(product, w)))

    variants = len(dag.bias[0])
    for out in dag.outputs:
        yield from walk_back(out, (1.0,) * variants)


def enumerated_path_sum(dag: NeuronDAG, q: float, variant: int = 0) -> float:
    """sum_p |Phi_p|^q by listing every path explicitly (only for tiny networks)."""
    return sum(abs(p[variant]) ** q for p in _paths(dag))


def enumerated_path_metric(dag: NeuronDAG) -> float:
    """||Phi(theta_0) - Phi(theta_1)||_1 by listing every path explicitly (only for tiny networks)."""
    return sum(abs(p[0] - p[1]) for p in _paths(dag))
