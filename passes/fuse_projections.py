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

fp8 layers (``_scaled_mm`` with per-row weight scales) fuse the same way when they read one
quantized activation with one scale (:mod:`para_fx.passes.cse` merges the quantization each layer
did of its own): their fp8 weights and their scales are concatenated alike.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .linear import linear_operands, scaled_linear_operands
from .shard_rules import family

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_VERSION = operator.attrgetter("_version")


@dataclasses.dataclass(frozen=True)
class Group:
    """One fused matmul: the input positions of its weights (fp8: and their scales, concatenated
    along ``scale_dim``; and biases), in output-column order."""

    weights: tuple[int, ...]
    biases: tuple[int, ...] | None
    scales: tuple[int, ...] | None = None
    scale_dim: int = 0

    def concatenated(self) -> list[tuple[str, tuple[int, ...], int]]:
        """The new inputs, in order: (what they are, input positions, dim they are concatenated along)."""
        parts = [("weight", self.weights, 0)]
        if self.scales is not None:
            parts.append(("scale", self.scales, self.scale_dim))
        if self.biases is not None:
            parts.append(("bias", self.biases, 0))
        return parts


@dataclasses.dataclass(frozen=True)
class _Member:
    """One projection: its matmul, its weight's input position (its scales', its bias'), and what
    the projections fused with it share (``key``)."""

    node: fx.Node
    weight: int
    bias: int | None
    scale: int | None
    key: tuple
    scale_dim: int = 0  # the dim of the scales that runs along the weight's rows


def fuse_projections(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Group]:
    """Rewrite ``gm`` in place; returns the groups, whose concatenated weights (scales, biases) are
    the graph's new last inputs, in group order."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    position = {node: i for i, node in enumerate(placeholders)}
    candidates: dict[tuple, list[_Member]] = {}
    nearest = _nearest_attention(gm.graph)
    for node in gm.graph.nodes:
        member = _projection(node, position, example_inputs) or _scaled_projection(node, position, example_inputs)
        if member is not None:
            key = (member.key, nearest[node], member.bias is not None, example_inputs[member.weight].dtype)
            candidates.setdefault(key, []).append(member)
    groups = []
    last = placeholders[-1]
    for members in candidates.values():
        if len(members) < 2:
            continue
        scaled = members[0].scale is not None
        group = Group(
            tuple(m.weight for m in members),
            None if members[0].bias is None else tuple(m.bias for m in members),
            tuple(m.scale for m in members) if scaled else None,
            members[0].scale_dim,
        )
        fake_mode = getattr(members[0].node.args[0].meta.get("val"), "fake_mode", None)  # the graph's own
        fused = []
        for kind, positions, dim in group.concatenated():
            last = _input_after(gm.graph, last, f"fused_{kind}_{len(groups)}", [example_inputs[i] for i in positions], dim, fake_mode)
            fused.append(last)
        widths = [example_inputs[m.weight].shape[0] for m in members]
        (_rewrite_scaled if scaled else _rewrite)(gm.graph, [m.node for m in members], fused, widths)
        groups.append(group)
    if groups:
        gm.graph.eliminate_dead_code()  # the transposes of the old weights, and their scales
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


def _input_after(graph: fx.Graph, last: fx.Node, name: str, parts: list[torch.Tensor], dim: int, fake_mode) -> fx.Node:
    """A new graph input for ``cat(parts, dim)``, with the value metadata later passes read."""
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    if fake_mode is not None:
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
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


def _projection(node: fx.Node, position: dict[fx.Node, int], inputs: Sequence[Any]) -> _Member | None:
    """``x @ W.t() (+ b)`` with W, b graph inputs."""
    operands = linear_operands(node)
    if operands is None:
        return None
    bias, mat1, weight = operands
    if not _weight_input(weight, bias, position, inputs):
        return None
    return _Member(node, position[weight], None if bias is None else position[bias], None, ("mm", _source(mat1)))


def _scaled_projection(node: fx.Node, position: dict[fx.Node, int], inputs: Sequence[Any]) -> _Member | None:
    """An fp8 linear layer whose weight, per-row weight scales and bias are graph inputs."""
    op = scaled_linear_operands(node)
    if op is None or not _weight_input(op.weight, op.bias, position, inputs) or op.weight_scale not in position:
        return None
    weight, scale = inputs[position[op.weight]], inputs[position[op.weight_scale]]
    rows = (weight.shape[0], 1) if op.scale_transposed else (1, weight.shape[0])
    if not isinstance(scale, torch.Tensor) or type(scale) not in (torch.Tensor, torch.nn.Parameter) or tuple(scale.shape) != rows:
        return None  # a scale per tensor: the weights would need one scale between them
    key = ("scaled_mm", _source(op.activation), op.activation_scale, op.scale_transposed, op.out_dtype, op.use_fast_accum)
    bias = None if op.bias is None else position[op.bias]
    return _Member(node, position[op.weight], bias, position[op.weight_scale], key, 0 if op.scale_transposed else 1)


def _weight_input(weight: fx.Node, bias: fx.Node | None, position: dict[fx.Node, int], inputs: Sequence[Any]) -> bool:
    """Whether the weight and bias are plain tensors among the graph's inputs (a bias of one dim)."""
    if bias is not None and (bias not in position or inputs[position[bias]].dim() != 1):
        return False
    return weight in position and type(inputs[position[weight]]) in (torch.Tensor, torch.nn.Parameter)


def _source(activation: Any) -> Any:
    """What identifies an activation: the node, or a view's base and shape (each projection views it anew)."""
    if isinstance(activation, fx.Node) and activation.target in _VIEWS:
        return activation.args[0], tuple(activation.args[1])
    return activation


def _rewrite(graph: fx.Graph, members: list[fx.Node], fused: list[fx.Node], widths: list[int]) -> None:
    """One matmul at the first member, its output split into the members' columns."""
    first = members[0]
    weight, bias = fused[0], (fused[1] if len(fused) > 1 else None)
    with graph.inserting_before(first):
        mat1 = first.args[1] if bias is not None else first.args[0]
        transposed = _call(graph, aten.t.default, (weight,))
        if bias is None:
            matmul = _call(graph, aten.mm.default, (mat1, transposed))
        else:
            matmul = _call(graph, aten.addmm.default, (bias, mat1, transposed))
    _split_into(graph, members, matmul, widths)


def _rewrite_scaled(graph: fx.Graph, members: list[fx.Node], fused: list[fx.Node], widths: list[int]) -> None:
    """One ``_scaled_mm`` at the first member, on the concatenated fp8 weights and scales."""
    first = members[0]
    op = scaled_linear_operands(first)
    weight, scale, bias = fused[0], fused[1], (fused[2] if len(fused) > 2 else None)
    with graph.inserting_before(first):
        transposed = _call(graph, aten.t.default, (weight,))
        scale_b = _call(graph, aten.t.default, (scale,)) if op.scale_transposed else scale
        args = (op.activation, transposed, op.activation_scale, scale_b, bias, None, op.out_dtype, op.use_fast_accum)
        matmul = _call(graph, aten._scaled_mm.default, args)
    _split_into(graph, members, matmul, widths)


def _split_into(graph: fx.Graph, members: list[fx.Node], matmul: fx.Node, widths: list[int]) -> None:
    """``matmul``'s columns, split, replace the members' outputs; the members go."""
    with graph.inserting_after(matmul):
        parts = _call(graph, aten.split_with_sizes.default, (matmul, widths, 1))
    previous = parts
    for i, member in enumerate(members):
        with graph.inserting_after(previous):
            previous = _call(graph, operator.getitem, (parts, i))
        member.replace_all_uses_with(previous)
    for member in members:
        graph.erase_node(member)


class FusedWeights:
    """The concatenated weights (then biases) of a graph's fused projections, built from the
    model's parameters and rebuilt when one of them changed: a new tensor, or an in-place write."""

    def __init__(self, groups: list[Group], inputs: Sequence[Any]):
        self.groups = groups
        sources = sorted({i for g in groups for _, positions, _ in g.concatenated() for i in positions})
        pick = operator.itemgetter(*sources)
        self.pick = pick if len(sources) > 1 else lambda items: (pick(items),)
        self.seen: tuple[list[int], list[int]] | None = None
        self.tensors: list[torch.Tensor] = []
        self.refresh(inputs)

    def refresh(self, inputs: Sequence[Any]) -> None:
        sources = self.pick(inputs)  # C loops: FLUX has about 700 sources, checked on every call
        seen = (list(map(torch.Tensor.data_ptr, sources)), list(map(_VERSION, sources)))
        if seen == self.seen:
            return
        self.tensors = []  # free the old copies before building new ones
        with torch.no_grad():
            for g in self.groups:
                for _, positions, dim in g.concatenated():
                    self.tensors.append(torch.cat([inputs[i] for i in positions], dim))
        self.seen = seen

    def calling(self, compiled: Callable[..., Any], user_inputs: int) -> Callable[..., Any]:
        """``compiled`` called with these tensors after the first ``user_inputs`` arguments (before
        the inputs a later pass added)."""

        def call(*args: Any) -> Any:
            self.refresh(args)
            return compiled(*args[:user_inputs], *self.tensors, *args[user_inputs:])

        return call
