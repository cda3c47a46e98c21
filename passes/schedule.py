"""Order a sharded graph so that every transfer runs under compute that does not need it.

A functional collective starts where its node stands and is waited for at its ``wait_tensor``;
what runs between the two hides the transfer. Tracing puts a block's independent work (FLUX's
MLP input projection, which no attention needs) before the attention's all-to-all, where it
hides nothing. This pass moves such work after the collective's start, into its window:

- each collective starts as soon as its inputs exist: the nodes between the previous wait and
  the collective that it does not depend on move behind it (they keep their order);
- each ``wait_tensor`` moves down to just before its first user.

Only the order changes, so the results are the same. Inductor keeps the graph's order for
its kernels and collectives, and runs the collectives on their own stream.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from para_fx.inspect.dump import is_collective

WAIT = torch.ops._c10d_functional.wait_tensor.default


def overlap_collectives(gm: fx.GraphModule) -> int:
    """Reorder ``gm`` in place; returns how many nodes moved into a collective's window."""
    graph = gm.graph
    moved = 0
    region_start: fx.Node | None = None  # the last wait seen: work before it is not ours to move
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is WAIT or _is_barrier(node):
            region_start = node
        elif is_collective(node):
            moved += _start_early(graph, node, region_start)
    for wait in list(graph.find_nodes(op="call_function", target=WAIT)):
        _wait_late(wait)
    graph.lint()
    gm.recompile()
    return moved


def _start_early(graph: fx.Graph, collective: fx.Node, region_start: fx.Node | None) -> int:
    """Move the work between ``region_start`` and ``collective`` that it does not depend on behind it."""
    region = []
    node = collective.prev
    while node is not region_start and node.op != "root":
        region.append(node)
        node = node.prev
    needed = _ancestors(collective, set(region))
    independent = [n for n in reversed(region) if n not in needed and n.op == "call_function"]
    anchor = collective
    for n in independent:  # each after the last: their order stays
        anchor.append(n)
        anchor = n
    return len(independent)


def _is_barrier(node: fx.Node) -> bool:
    """Work that must keep its place: random numbers, and writes to memory that another node reads
    (an in-place op on a temporary only it uses moves with its data)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return True
    schema = target._schema
    for argument, value in zip(schema.arguments, node.args):
        if argument.alias_info is not None and argument.alias_info.is_write:
            if not isinstance(value, fx.Node) or value.op != "call_function" or set(value.users) != {node}:
                return True
    return any(
        argument.alias_info is not None and argument.alias_info.is_write and argument.name in node.kwargs
        for argument in schema.arguments
    )


def _ancestors(node: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    """The nodes of ``within`` that ``node`` depends on."""
    found: set[fx.Node] = set()
    stack = [a for a in node.all_input_nodes if a in within]
    while stack:
        n = stack.pop()
        if n in found:
            continue
        found.add(n)
        stack.extend(a for a in n.all_input_nodes if a in within)
    return found


def _wait_late(wait: fx.Node) -> None:
    """Move ``wait`` to just before its first user (it stays where it is without users)."""
    users = set(wait.users)
    if not users:
        return
    node = wait.next
    while node not in users:
        node = node.next
    if node is not wait.next:
        node.prepend(wait)
