"""Split the matmuls of replicated vectors by output columns; one all-gather joins them.

A DiT conditions every block on one vector (the timestep and pooled text): each block projects it
to its scales and shifts (adaLN modulation), a matmul of a few rows against a large weight. The
shard pass leaves them replicated, so every rank reads every such weight: on FLUX, 95 of them,
6.4 GB a step, 2.3 ms on an H200 at any world size. Each rank can instead read its share of each
weight's rows, compute its share of the output columns, and get the rest from the others.

The pass takes the ``addmm``/``mm`` nodes whose activation has at most :data:`MAX_ROWS` rows and
is computed from graph inputs only through replicated values (the shard pass marks each node's
placement), and whose weight is a graph input. Their inputs depend on nothing the blocks compute,
so the pass moves them, with the replicated ops that compute their activations, in front of the
first use of any of their outputs, concatenates the local results, and gathers them with one
collective: one transfer of a few MiB instead of one per block. It runs on the graph after the
sequence shard pass, with its group.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from para_fx.core.capture import propagate
from para_fx.inspect.dump import is_collective

from .linear import linear_operands
from .shard_rules import Group, val

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

MAX_ROWS = 16  # a vector per sample: the batch, never the tokens
MIN_BYTES = 256 * 2**20  # weights read per step below which one more collective is not worth it


@dataclasses.dataclass(frozen=True)
class Split:
    """What the pass did: how many matmuls, and the weight bytes each rank no longer reads."""

    matmuls: int
    bytes_saved: int


def split_vector_matmuls(gm: fx.GraphModule, group: Group, min_bytes: int | None = None) -> Split | None:
    """Rewrite ``gm`` in place; None where there is too little to gain (fewer weight bytes than
    ``min_bytes``, default :data:`MIN_BYTES`)."""
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    is_replicated = _Replicated()
    candidates = [m for node in nodes if (m := _member(node, group.parts, is_replicated)) is not None]
    cones = {m.node: _replicated_cone(m.node) for m in candidates}
    # a matmul that others are computed from (the embedders' linears in front of the modulations)
    # stays whole: the gather comes after all of the split ones
    behind_others = set().union(*cones.values()) if cones else set()
    members = [m for m in candidates if m.node not in behind_others]
    if members:  # one gathered tensor: the same rows and dtype
        first = val(members[0].node)
        members = [m for m in members if (m.rows, val(m.node).dtype) == (first.shape[0], first.dtype)]
    weight_bytes = sum(m.weight_bytes for m in members)
    if not members or weight_bytes < min_bytes:
        return None
    first_use = min(position[user] for m in members for user in m.node.users)
    here = nodes[first_use]
    cone = sorted(set().union(*(cones[m.node] for m in members)), key=position.__getitem__)
    for node in cone:  # in graph order, so every moved node's inputs stay before it
        if position[node] > first_use:
            here.prepend(node)
            node.meta.pop("nn_module_stack", None)  # no longer inside its block's span (passes/blocks.py)
    graph = gm.graph
    with graph.inserting_before(here):
        locals_ = [_local_matmul(graph, m, group) for m in members]
        flat = _call(graph, aten.cat.default, (locals_, 1))
        gathered = _call(graph, c10d.all_gather_into_tensor.default, (flat, group.parts, group.name))
        gathered = _call(graph, c10d.wait_tensor.default, (gathered,))
        rows = members[0].rows
        width = sum(m.columns // group.parts for m in members)
        by_rank = _call(graph, aten.view.default, (gathered, [group.parts, rows, width]))
        offset = 0
        for m in members:
            local = m.columns // group.parts
            piece = _call(graph, aten.slice.Tensor, (by_rank, 2, offset, offset + local))
            piece = _call(graph, aten.permute.default, (piece, [1, 0, 2]))
            piece = _call(graph, aten.clone.default, (piece,), {"memory_format": torch.contiguous_format})
            whole = _call(graph, aten.view.default, (piece, [rows, m.columns]))
            whole.meta["custom"] = {**(m.node.meta.get("custom") or {})}
            m.node.replace_all_uses_with(whole)
            offset += local
    for m in members:
        transposed = m.node.args[-1]
        graph.erase_node(m.node)
        if not transposed.users:
            graph.erase_node(transposed)
    graph.lint()
    gm.recompile()
    return Split(len(members), weight_bytes - weight_bytes // group.parts)


@dataclasses.dataclass(frozen=True)
class _Member:
    node: fx.Node  # the addmm or mm
    bias: fx.Node | None
    activation: fx.Node
    weight: fx.Node  # a graph input, [columns, inner]
    rows: int
    columns: int
    weight_bytes: int


def _member(node: fx.Node, parts: int, is_replicated) -> _Member | None:
    operands = linear_operands(node)
    if operands is None:
        return None
    bias, activation, weight = operands
    if bias is not None and not (bias.op == "placeholder" and len(val(bias).shape) == 1):
        return None
    value = val(weight)
    if weight.op != "placeholder" or type(value) is not torch._subclasses.FakeTensor or value.dim() != 2:
        return None  # a quantized weight (a tensor subclass) keeps its own kernel
    rows, columns = val(node).shape
    if rows > MAX_ROWS or columns % parts or not is_replicated(activation):
        return None
    return _Member(node, bias, activation, weight, rows, columns, value.numel() * value.element_size())


class _Replicated:
    """Whether a value is the same on every rank and computed from graph inputs alone: every node
    behind it is marked replicated by the shard pass, none is a collective."""

    def __init__(self):
        self.known: dict[fx.Node, bool] = {}

    def __call__(self, node: fx.Node) -> bool:
        if node not in self.known:
            if node.op == "placeholder":
                self.known[node] = True
            elif node.op != "call_function" or is_collective(node) or _placement(node) != "R":
                self.known[node] = False
            else:
                self.known[node] = all(self(a) for a in node.all_input_nodes)
        return self.known[node]


def _replicated_cone(matmul: fx.Node) -> set[fx.Node]:
    """The ops that compute the matmul's operands from graph inputs (the matmul's transpose included)."""
    cone, stack = set(), list(matmul.all_input_nodes)
    while stack:
        node = stack.pop()
        if node.op == "call_function" and node not in cone:
            cone.add(node)
            stack.extend(node.all_input_nodes)
    return cone


def _local_matmul(graph: fx.Graph, m: _Member, group: Group) -> fx.Node:
    """This rank's output columns: its rows of the weight (a view) times the activation."""
    local = m.columns // group.parts
    start, end = group.rank * local, (group.rank + 1) * local
    weight = _call(graph, aten.slice.Tensor, (m.weight, 0, start, end))
    transposed = _call(graph, aten.t.default, (weight,))
    if m.bias is None:
        return _call(graph, aten.mm.default, (m.activation, transposed))
    bias = _call(graph, aten.slice.Tensor, (m.bias, 0, start, end))
    return _call(graph, aten.addmm.default, (bias, m.activation, transposed))


def _call(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A node with its fake value, as later passes read it; replicated, as the shard pass marks it."""
    node = graph.call_function(target, args, kwargs or {})
    propagate(node)
    node.meta["custom"] = {"para_placement": "R"}
    return node


def _placement(node: fx.Node) -> str | None:
    return (node.meta.get("custom") or {}).get("para_placement")
