"""Moving a value of the graph being built from one placement to another.

Replicate -> Shard is a local slice (free); Shard -> Replicate an all-gather, unless the value is a
short chain of views and pointwise ops over replicated values (a RoPE table), which is cheaper to
re-compute whole; Partial -> Replicate an all-reduce. Each move is made once per (value, target
placement) and given the memory order of the value it stands for, so later views stay valid.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from para_fx.core.placement import REPLICATE, Partial, Placement, Replicate, Shard, same_split
from para_fx.runtime import collectives

from .shard_rules import Group, family, tensor_inputs, val

# families whose ops are cheap enough to re-run on whole tensors instead of gathering their result
_RECOMPUTABLE = ("pointwise", "copy", "view", "reshape", "slice")


def mark(node: fx.Node, **entries: object) -> None:
    """Note on a node, for the reports, in the meta that re-tracing keeps (``custom``)."""
    node.meta["custom"] = {**(node.meta.get("custom") or {}), **entries}


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dims from outermost to innermost in memory."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride()[d], -d)))


def _same_rows(have: Placement, want: Placement, parts: int) -> bool:
    """Two splits of one dim that give every rank the same items (1024 tokens, or 32 rows of 32)."""
    if not (isinstance(have, Shard) and isinstance(want, Shard)):
        return False
    return have.dim == want.dim and same_split(have.layout, want.layout, parts)


class Redistributor:
    """Inserts the moves the emitted graph needs, reading the plan's placements of original nodes."""

    def __init__(self, group: Group, env: dict, placements: dict, call: Callable[..., fx.Node]):
        self.group, self.env, self.placements, self.call = group, env, placements, call
        self.moved: dict[tuple[fx.Node, Placement], fx.Node] = {}
        self.full: dict[fx.Node, fx.Node] = {}  # values whose replicated original is at hand

    def value(self, node: fx.Node, want: Placement, user: fx.Node) -> fx.Node:
        """``node``'s emitted value in placement ``want``."""
        have = self.placements[node]
        if have == want or _same_rows(have, want, self.group.parts):
            return self.env[node]
        key = (node, want)
        if key not in self.moved:
            self.moved[key] = self._move(node, have, want, user)
            mark(self.moved[key], para_placement=str(want))
        return self.moved[key]

    def _move(self, node: fx.Node, have: Placement, want: Placement, user: fx.Node) -> fx.Node:
        g, x = self.group, self.env[node]
        if isinstance(have, Shard) and have != want:  # a cheap replicated recomputation beats a gather
            whole = self._recompute(node, budget=[16])
            if whole is not None:
                x, have = whole, REPLICATE
        if isinstance(have, Partial):
            x = self.call(collectives.reduce, (x, have.reduce, g.name), user)
            have = REPLICATE
        if isinstance(have, Shard) and have != want:
            x = self.call(collectives.gather, (x, have.dim, have.layout, g.parts, g.name), user)
            have = REPLICATE
        if isinstance(want, Shard):
            x = self.call(collectives.take_local, (x, want.dim, want.layout, g.parts, g.rank), user)
        return self.restride(x, node, user)

    def restride(self, x: fx.Node, like: fx.Node, user: fx.Node) -> fx.Node:
        """Give an inserted value the memory order of the value it stands for, so the graph's views stay valid."""
        v = val(like)
        if isinstance(v, (tuple, list)):
            v = v[0]
        return self.call(collectives.in_memory_order, (x, memory_order(v)), user)

    def _recompute(self, node: fx.Node, budget: list[int]) -> fx.Node | None:
        """The replicated value of ``node`` by re-running a short chain of views and pointwise ops
        from values that are replicated (e.g. a RoPE table sliced to one layout, needed in another)."""
        if node in self.full:
            return self.full[node]
        if isinstance(self.placements[node], Replicate):
            return self.env[node]
        budget[0] -= 1
        if budget[0] < 0 or node.op != "call_function" or family(node.target) not in _RECOMPUTABLE:
            return None
        whole_inputs: dict[fx.Node, Any] = {}
        for a in tensor_inputs(node):
            whole_inputs[a] = self._recompute(a, budget)
            if whole_inputs[a] is None:
                return None
        remap = lambda a: whole_inputs[a] if a in whole_inputs else self.env[a]
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), remap)
        self.full[node] = self.call(node.target, args, node, kwargs)
        return self.full[node]
