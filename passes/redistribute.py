"""Moving a value of the graph being built from one placement to another.

Replicate -> Shard is a local slice (free); Shard -> Replicate an all-gather, unless the value is a
short chain of views and pointwise ops over replicated values (a RoPE table), which is cheaper to
re-compute whole; Partial -> Replicate an all-reduce. Each move is made once per (value, target
placement) and given the memory order of the value it stands for, so later views stay valid.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from para_fx.core.placement import REPLICATE, Partial, Placement, Replicate, Shard, same_split
from para_fx.runtime import collectives

from .shard_rules import Group, family, tensor_inputs, val

# families whose ops are cheap enough to re-run on whole tensors instead of gathering their result
_RECOMPUTABLE = ("pointwise", "copy", "view", "reshape", "slice", "split", "join", "scatter")


def whole_chain(node: fx.Node, placements: dict, at_hand: Callable[[fx.Node], bool], budget: int = 16) -> list[fx.Node] | None:
    """The nodes to re-run, inputs first, for ``node``'s replicated value without communication:
    a short chain of cheap ops from values replicated or ``at_hand`` whole (split where they
    appear, the original kept); None if there is none. The plan asks it before calling an op's
    whole input free; the emitter then re-runs the chain it names."""
    chain: list[fx.Node] = []

    def visit(n: fx.Node) -> bool:
        if n in chain or at_hand(n) or isinstance(placements[n], Replicate):
            return True
        if len(chain) >= budget or n.op != "call_function":
            return False
        if n.target is operator.getitem:  # an item of a split: re-run the split
            inputs = [n.args[0]]
        elif family(n.target) in _RECOMPUTABLE:
            inputs = tensor_inputs(n)
        else:
            return False
        if not all(visit(a) for a in inputs):
            return False
        chain.append(n)
        return True

    return chain if visit(node) else None


def mark(node: fx.Node, **entries: object) -> None:
    """Note on a node, for the reports, in the meta that re-tracing keeps (``custom``)."""
    node.meta["custom"] = {**(node.meta.get("custom") or {}), **entries}


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dims from outermost to innermost in memory."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride()[d], -d)))


def same_rows(have: Placement, want: Placement, parts: int) -> bool:
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
        if have == want or same_rows(have, want, self.group.parts):
            return self.env[node]
        key = (node, want)
        if key not in self.moved:
            self.moved[key] = self._move(node, have, want, user)
            mark(self.moved[key], para_placement=str(want))
        return self.moved[key]

    def _move(self, node: fx.Node, have: Placement, want: Placement, user: fx.Node) -> fx.Node:
        g, x = self.group, self.env[node]
        if isinstance(have, Shard) and have != want:  # a cheap replicated recomputation beats a gather
            whole = self._recompute(node)
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

    def _recompute(self, node: fx.Node) -> fx.Node | None:
        """The replicated value of ``node`` by re-running a short chain of cheap ops from values
        whole at hand (e.g. a RoPE table sliced to one layout, needed in another)."""
        chain = whole_chain(node, self.placements, lambda n: n in self.full)
        if chain is None:
            return None
        for n in chain:
            remap = lambda a: self.full.get(a, self.env[a])
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), remap)
            self.full[n] = self.call(n.target, args, n, kwargs)
        return self.full.get(node, self.env[node])
