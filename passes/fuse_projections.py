"""Fuse the linear projections that read the same activation into one matmul.

A DiT block projects one normalised activation several times: queries, keys and values. Each is
a matmul with few output columns, and once context parallelism has cut the rows in half, each is
too small to fill the GPU. One matmul against the concatenated weights computes the same numbers
in one wider, faster kernel.

The pass groups ``addmm``/``mm`` nodes whose first operand is the same activation (through the
same view), whose weights and biases are graph inputs, and whose outputs reach the same attention
first; each group becomes one matmul whose output is split back into the original columns. A
projection of the same activation that no attention of the block needs (FLUX's MLP input) stays
apart: it is the work that runs while the attention's transfer is in flight. The concatenated weights become new graph
inputs, built once by :class:`FusedWeights` from the model's parameters and rebuilt whenever a
parameter changes (a version counter or a new tensor), so a graph never runs with stale weights.
They cost memory: one more copy of the fused weights.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .linear import linear_operands
from .shard_rules import family

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclasses.dataclass(frozen=True)
class Group:
    """One fused matmul: the input positions of its weights (and biases), in output-column order."""

    weights: tuple[int, ...]
    biases: tuple[int, ...] | None


def fuse_projections(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Group]:
    """Rewrite ``gm`` in place; returns the groups, whose concatenated weights (then biases) are
    the graph's new last inputs, in group order."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    position = {node: i for i, node in enumerate(placeholders)}
    candidates: dict[tuple, list[tuple[fx.Node, int, int | None]]] = {}
    nearest = _nearest_attention(gm.graph)
    for node in gm.graph.nodes:
        found = _projection(node, position, example_inputs)
        if found is not None:
            activation, weight, bias = found
            key = (activation, nearest[node], bias is not None, example_inputs[weight].dtype)
            candidates.setdefault(key, []).append((node, weight, bias))
    groups = []
    last = placeholders[-1]
    for members in candidates.values():
        if len(members) < 2:
            continue
        first = members[0][0]
        fake_mode = getattr(first.args[-2].meta.get("val"), "fake_mode", None)  # the activation's: the graph's own
        group = Group(tuple(w for _, w, _ in members), None if members[0][2] is None else tuple(b for _, _, b in members))
        weight = last = _input_after(gm.graph, last, f"fused_weight_{len(groups)}", [example_inputs[i] for i in group.weights], fake_mode)
        bias = None
        if group.biases is not None:
            bias = last = _input_after(gm.graph, last, f"fused_bias_{len(groups)}", [example_inputs[i] for i in group.biases], fake_mode)
        _rewrite(gm.graph, [m for m, _, _ in members], weight, bias, [example_inputs[w].shape[0] for w in group.weights])
        groups.append(group)
    if groups:
        gm.graph.lint()
        gm.recompile()
    return groups


def _nearest_attention(graph: fx.Graph) -> dict[fx.Node, int]:
    """For every node, the graph position of the first attention op its output reaches (-1: none)."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    nearest: dict[fx.Node, int] = {}
    for node in reversed(nodes):
        reached = [position[u] if family(u.target) == "attention" else nearest[u] for u in node.users]
        reached = [p for p in reached if p >= 0]
        nearest[node] = min(reached) if reached else -1
    return nearest


def _input_after(graph: fx.Graph, last: fx.Node, name: str, parts: list[torch.Tensor], fake_mode) -> fx.Node:
    """A new graph input for ``cat(parts)``, with the value metadata later passes read."""
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    if fake_mode is not None:
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        with fake_mode:
            node.meta["val"] = torch.empty(shape, dtype=parts[0].dtype, device=parts[0].device)
    return node


def _call(graph: fx.Graph, target, args: tuple) -> fx.Node:
    """``graph.call_function`` with the node's value metadata computed from its arguments'."""
    node = graph.call_function(target, args)
    values = fx.node.map_arg(args, lambda a: a.meta.get("val"))
    if all(v is not None for v in fx.node.map_aggregate(values, lambda v: v) if not isinstance(v, (int, list, tuple))):
        node.meta["val"] = target(*values)
    return node


def _projection(node: fx.Node, position: dict[fx.Node, int], inputs: Sequence[Any]):
    """``(activation key, weight input, bias input or None)`` for ``x @ W.t() (+ b)`` with W, b graph inputs."""
    operands = linear_operands(node)
    if operands is None:
        return None
    bias, mat1, weight = operands
    if bias is not None and (bias not in position or inputs[position[bias]].dim() != 1):
        return None
    if weight not in position or not isinstance(inputs[position[weight]], torch.Tensor):
        return None
    if type(inputs[position[weight]]) not in (torch.Tensor, torch.nn.Parameter):
        return None
    source = mat1
    if isinstance(mat1, fx.Node) and mat1.target in _VIEWS:
        source = (mat1.args[0], tuple(mat1.args[1]))
    return source, position[weight], None if bias is None else position[bias]


def _rewrite(graph: fx.Graph, members: list[fx.Node], weight: fx.Node, bias: fx.Node | None, widths: list[int]):
    """One matmul at the first member, its output split into the members' columns."""
    first = members[0]
    with graph.inserting_before(first):
        mat1 = first.args[1] if bias is not None else first.args[0]
        transposed = _call(graph, aten.t.default, (weight,))
        if bias is None:
            fused = _call(graph, aten.mm.default, (mat1, transposed))
        else:
            fused = _call(graph, aten.addmm.default, (bias, mat1, transposed))
        parts = _call(graph, aten.split_with_sizes.default, (fused, widths, 1))
    for i, member in enumerate(members):
        with graph.inserting_before(first):
            piece = _call(graph, operator.getitem, (parts, i))
        member.replace_all_uses_with(piece)
    for member in members:
        old_transpose = member.args[2] if bias is not None else member.args[1]
        graph.erase_node(member)
        graph.erase_node(old_transpose)


class FusedWeights:
    """The concatenated weights (then biases) of a graph's fused projections, built from the
    model's parameters and rebuilt when one of them changed: a new tensor, or an in-place write."""

    def __init__(self, groups: list[Group], inputs: Sequence[Any]):
        self.groups = groups
        self.sources = sorted({i for g in groups for i in (*g.weights, *(g.biases or ()))})
        self.seen: list[tuple[int, int]] = []
        self.tensors: list[torch.Tensor] = []
        self.refresh(inputs)

    def refresh(self, inputs: Sequence[Any]) -> None:
        seen = [(inputs[i].data_ptr(), inputs[i]._version) for i in self.sources]
        if seen == self.seen:
            return
        self.tensors = []  # free the old copies before building new ones
        with torch.no_grad():
            for g in self.groups:
                self.tensors.append(torch.cat([inputs[i] for i in g.weights]))
                if g.biases is not None:
                    self.tensors.append(torch.cat([inputs[i] for i in g.biases]))
        self.seen = seen

    def calling(self, compiled: Callable[..., Any], user_inputs: int) -> Callable[..., Any]:
        """``compiled`` called with these tensors after the first ``user_inputs`` arguments (before
        the inputs a later pass added)."""

        def call(*args: Any) -> Any:
            self.refresh(args)
            return compiled(*args[:user_inputs], *self.tensors, *args[user_inputs:])

        return call
