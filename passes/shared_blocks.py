"""Shared blocks: each transformer block becomes a call of one subgraph per distinct block.

Inductor lowers and generates code for the graph behind each ``invoke_subgraph`` identifier
once, so a stack of N identical blocks costs one block's compile instead of N (FLUX's 57 blocks
make four subgraphs: README, Design). Runs on the final aten graph, just before the inner compile: the collectives the
shard passes put inside a block go into its subgraph.

Blocks come from :func:`passes.blocks.find_blocks` (module paths). A block is outlined as the
contiguous run of graph nodes between its first and last node; everything it reads from before
(activations, its weights, constants) becomes an operand. Two blocks share one subgraph and one
identifier when their node lists are the same up to their operands: same ops, literal arguments,
and shapes, strides and dtypes of every value. A block that cannot be outlined safely stays inline
and the reason is noted in the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator

import torch
import torch.fx as fx

from para_fx.core.capture import may_alias
from para_fx.inspect.dump import is_collective
from para_fx.inspect.report import Report

from .blocks import Block, find_blocks
from .schedule import WAIT

aten = torch.ops.aten
invoke_subgraph = torch.ops.higher_order.invoke_subgraph


@dataclasses.dataclass
class _Outline:
    """One block cut out of the graph: its nodes, what it reads, what is read after it."""

    block: Block
    members: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]


def share_blocks(gm: fx.GraphModule, report: Report) -> bool:
    """Outline ``gm``'s transformer blocks (in place) into ``invoke_subgraph`` calls; True if any."""
    nodes = list(gm.graph.nodes)
    outlines = []
    for block in find_blocks(gm.graph):
        outline = _outline(nodes, block)
        problem = _problem(outline)
        if problem:
            report.notes.append(f"shared blocks: {block.name} left inline: {problem}")
        else:
            outlines.append(outline)
    if not outlines:
        return False
    # identifiers and subgraphs first: replacing a block rewires the inputs of the blocks after it
    identifiers = ["para_block_" + hashlib.sha256(_signature(o).encode()).hexdigest()[:16] for o in outlines]
    subgraphs: dict[str, str] = {}  # identifier -> attribute name in gm
    for outline, identifier in zip(outlines, identifiers):
        if identifier not in subgraphs:
            subgraphs[identifier] = f"shared_block_{len(subgraphs)}"
            gm.register_module(subgraphs[identifier], _subgraph(outline))
    results: dict[fx.Node, fx.Node] = {}  # a block's output -> the call's result that replaced it
    for outline, identifier in zip(outlines, identifiers):
        results.update(_replace(gm, outline, subgraphs[identifier], identifier, results))
        report.shared_blocks[outline.block.name] = identifier
    gm.graph.lint()
    gm.recompile()
    return True


def _outline(nodes: list[fx.Node], block: Block) -> _Outline:
    """The ops between the block's first and last node (graph inputs and attributes stay outside)."""
    members = [n for n in nodes[block.first : block.last + 1] if n.op == "call_function"]
    inside = set(members)
    inputs = _reads(members, inside)
    outputs = [n for n in members if any(user not in inside for user in n.users)]
    return _Outline(block, members, inputs, outputs)


def _reads(members, inside: set[fx.Node]) -> list[fx.Node]:
    return list(dict.fromkeys(a for n in members for a in n.all_input_nodes if a not in inside))


def _problem(outline: _Outline) -> str | None:
    """Why this block cannot become a subgraph call, or None."""
    inside = set(outline.members)
    if not outline.outputs:
        return "nothing after it reads its result"
    for node in outline.inputs + outline.outputs:
        if not isinstance(node.meta.get("val"), torch.Tensor):
            return f"value {node.name} crossing its boundary is not a tensor"
    for node in outline.members:
        if not isinstance(node.meta.get("val"), (torch.Tensor, tuple, list)):
            return f"{node.name} ({node.target}) has no tensor metadata"
        if node.target is WAIT and node.args[0] not in inside:
            return f"it waits for a collective started before it ({node.name})"
        if is_collective(node) and any(u not in inside for u in node.users):
            return f"a collective it starts is waited for after it ({node.name})"
        if any(_base(arg) not in inside for arg in _mutated_args(node)):
            return f"{node.name} ({node.target}) writes to a value from outside it"
    return None


def _mutated_args(node: fx.Node) -> list[fx.Node]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    written = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            written += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, fx.Node)]
    return written


def _base(node: fx.Node) -> fx.Node:
    """The value whose memory a chain of views reads."""
    while node.op == "call_function" and may_alias(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _signature(outline: _Outline) -> str:
    """What makes two blocks the same subgraph: ops, literals, and every value's layout."""
    local = {node: ("input", i) for i, node in enumerate(outline.inputs)}
    local.update({node: ("node", i) for i, node in enumerate(outline.members)})
    ops = [
        (str(n.target), repr(fx.map_arg((n.args, n.kwargs), local.__getitem__)), _layout(n.meta["val"]))
        for n in outline.members
    ]
    operands = [_layout(n.meta["val"]) for n in outline.inputs]
    results = [local[n] for n in outline.outputs]
    return repr((ops, operands, results))


def _layout(value) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_layout(v) for v in value)
    return repr(value)


def _subgraph(outline: _Outline) -> fx.GraphModule:
    """``(*operands) -> (*outputs)``. Outputs that are views are copied: a subgraph's outputs must
    not alias its operands or each other. The copies are contiguous: with ``clone``'s default
    (preserve the view's strides) Inductor miscompiled FLUX's last single-stream block."""
    graph = fx.Graph()
    env = {}
    for i, node in enumerate(outline.inputs):
        env[node] = graph.placeholder(f"operand_{i}")
        env[node].meta["val"] = node.meta["val"]
    for node in outline.members:
        env[node] = graph.node_copy(node, env.__getitem__)
    results = []
    for node in outline.outputs:
        value = env[node]
        if may_alias(node):
            value = graph.call_function(aten.clone.default, (value,), {"memory_format": torch.contiguous_format})
            value.meta["val"] = node.meta["val"].clone(memory_format=torch.contiguous_format)
        results.append(value)
    graph.output(tuple(results))
    return fx.GraphModule(torch.nn.Module(), graph)


def _replace(gm: fx.GraphModule, outline: _Outline, attribute: str, identifier: str, results: dict) -> dict:
    """The block's nodes -> one ``invoke_subgraph`` call, placed after them, and its results;
    returns ``{output: result}``. ``results``: what earlier blocks' outputs became."""
    inside = set(outline.members)
    operands = [results.get(node, node) for node in outline.inputs]
    with gm.graph.inserting_after(outline.members[-1]):
        subgraph = gm.graph.get_attr(attribute)
    with gm.graph.inserting_after(subgraph):
        call = gm.graph.call_function(invoke_subgraph, (subgraph, identifier, *operands))
    (returned,) = getattr(gm, attribute).graph.find_nodes(op="output")
    call.meta["val"] = tuple(value.meta["val"] for value in returned.args[0])  # views come back as copies
    previous, replaced = call, {}
    for i, node in enumerate(outline.outputs):
        with gm.graph.inserting_after(previous):
            result = gm.graph.call_function(operator.getitem, (call, i))
        result.meta = {**node.meta, "val": call.meta["val"][i]}
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
        previous = replaced[node] = result
    for node in reversed(outline.members):
        gm.graph.erase_node(node)
    return replaced
