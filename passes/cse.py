"""Merge repeated computations: nodes that apply the same pure aten op to the same arguments.

Inductor does not merge two buffers that compute the same thing. Quantized models repeat work
this way: torchao's dynamic fp8 quantizes a linear layer's input inside each layer, so a block's
query, key and value projections quantize one activation three times (an amax over every row and
a scaled copy, each time). One computation, read by every projection, is the same arithmetic; it
also lets :mod:`para_fx.passes.fuse_projections` see that the projections share their input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


def merge_common_subexpressions(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place so that each pure computation happens once; how many nodes went.

    A graph that mutates any tensor is left as it is: two equal reads around a write differ."""
    if any(_mutates(node.target) for node in gm.graph.nodes if node.op == "call_function"):
        return 0
    first: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _pure(node.target):
            continue
        key = (node.target, _frozen(node.args), _frozen(node.kwargs))
        try:
            earlier = first.setdefault(key, node)
        except TypeError:  # an argument that cannot be compared by value
            continue
        if earlier is not node:
            node.replace_all_uses_with(earlier)
            gm.graph.erase_node(node)
            merged += 1
    if merged:
        gm.graph.lint()
        gm.recompile()
    return merged


def _mutates(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def _pure(target: Any) -> bool:
    """An aten op whose result depends on its arguments only: no mutation, no random numbers."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _frozen(value: Any) -> Any:
    """``value`` with lists as tuples and dicts as sorted items, so that equal arguments hash equal;
    nodes compare by identity (already merged ones were replaced before they are read here)."""
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, float):
        return "float", value, str(value)  # 0.0 and -0.0 differ; nan never equals itself, so never merges
    return type(value).__name__, value
