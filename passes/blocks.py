"""Find the repeated transformer blocks of a captured graph, with no model class names.

A block is a child of a module list (``transformer_blocks.3``, ``blocks.0``): a path segment
followed by an index, read from each node's ``nn_module_stack``. The transformer's own block
lists are the ones whose blocks contain an attention and that sit highest in the module tree,
so embedders with their own small block lists (HunyuanVideo's token refiner) are left out and
models with two lists (FLUX's double- and single-stream blocks) keep both.
"""

from __future__ import annotations

import dataclasses
import re

import torch.fx as fx

from para_fx.inspect.dump import module_path

from .shard_rules import family

_INDEXED = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclasses.dataclass(frozen=True)
class Block:
    """One transformer block: its module path and the span of graph positions its nodes occupy."""

    name: str  # e.g. "single_transformer_blocks.3"
    first: int  # position of its first node in the graph
    last: int  # position of its last node


def block_of(node: fx.Node) -> str | None:
    """``transformer_blocks.3`` for a node made inside that block (or any module below it)."""
    match = _INDEXED.match(module_path(node))
    return f"{match.group(1)}.{match.group(2)}" if match else None


def find_blocks(graph: fx.Graph) -> list[Block]:
    """The transformer blocks in execution order."""
    spans: dict[str, list[int]] = {}
    with_attention: set[str] = set()
    for position, node in enumerate(graph.nodes):
        name = block_of(node)
        if name is None:
            continue
        span = spans.setdefault(name, [position, position])
        span[1] = position
        if family(node.target) == "attention":
            with_attention.add(name)
    if not with_attention:
        return []
    depth = lambda name: name.count(".")
    top = min(depth(name) for name in with_attention)
    lists = {_list_of(name) for name in with_attention if depth(name) == top}
    blocks = [Block(name, first, last) for name, (first, last) in spans.items() if _list_of(name) in lists]
    return sorted(blocks, key=lambda b: b.first)


def _list_of(block: str) -> str:
    return block.rsplit(".", 1)[0]
