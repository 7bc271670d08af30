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
    """Neurons 0..n-1 in topological order; edges[v] = [(u, weight)], bias[v]."""

    inputs: list[int] = field(default_factory=list)
    edges: list[list[tuple[int, float]]] = field(default_factory=list)
    bias: list[float] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def new(self, bias: float = 0.0) -> int:
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


def _build(net: nn.Module, dag: NeuronDAG, ids: list[int], shape: tuple[int, ...]):
    if isinstance(net, nn.Sequential):
        for layer in net:
            ids, shape = _build(layer, dag, ids, shape)
        return ids, shape
    if isinstance(net, Add):  # Sub too: an edge of weight -1
        a, shape_a = _build(net.a, dag, ids, shape)
        b, _ = _build(net.b, dag, ids, shape)
        sign = -1.0 if isinstance(net, Sub) else 1.0
        out = []
        for u, v in zip(a, b):
            w = dag.new()
            dag.edges[w] += [(u, 1.0), (v, sign)]
            out.append(w)
        return out, shape_a
    if isinstance(net, Cat):
        parts = [_build(branch, dag, ids, shape) for branch in net.branches]
        out_shape = (sum(s[0] for _, s in parts),) + parts[0][1][1:]
        return [i for part, _ in parts for i in part], out_shape
    matrix, bias, out_shape = _probe(net, shape)
    out = []
    for row, b in zip(matrix.tolist(), bias.tolist()):
        v = dag.new(b)
        dag.edges[v] = [(u, w) for u, w in zip(ids, row) if w != 0.0]
        out.append(v)
    return out, out_shape


def neuron_dag(net: nn.Module, input_shape: tuple[int, ...]) -> NeuronDAG:
    """The explicit DAG of a network built from Sequential / Add / Sub / Cat / Heads and leaf layers."""
    dag = NeuronDAG()
    dag.inputs = [dag.new() for _ in range(math.prod(input_shape))]
    if isinstance(net, Heads):
        trunk, shape = _build(net.trunk, dag, dag.inputs, input_shape)
        dag.outputs = _build(net.first, dag, trunk, shape)[0] + _build(net.second, dag, trunk, shape)[0]
    else:
        dag.outputs = _build(net, dag, dag.inputs, input_shape)[0]
    return dag


def path_sum(dag: NeuronDAG, q: float) -> float:
    """sum over paths p of |Phi_p|^q, by dynamic programming over neurons (sum over paths ending at v)."""
    into = [0.0] * len(dag.bias)
    inputs = set(dag.inputs)
    for v in range(len(dag.bias)):
        start = 1.0 if v in inputs else abs(dag.bias[v]) ** q
        into[v] = start + sum(abs(w) ** q * into[u] for u, w in dag.edges[v])
    return sum(into[v] for v in dag.outputs)


def enumerated_path_sum(dag: NeuronDAG, q: float) -> float:
    """The same sum, by listing every path explicitly (only for tiny networks)."""
    inputs = set(dag.inputs)
    total = 0.0

    def walk_back(v: int, product: float) -> None:
        nonlocal total
        if v in inputs:
            total += abs(product) ** q
            return
        if dag.bias[v] != 0.0:
            total += abs(product * dag.bias[v]) ** q
        for u, w in dag.edges[v]:
            walk_back(u, product * w)

    for out in dag.outputs:
        walk_back(out, 1.0)
    return total
