"""The First Block Cache pass: one ``torch.cond`` around the middle transformer blocks.

Per step the first ``compute_first`` blocks (the *prefix*) always run. Their residual (output
minus input) is compared with the previous step's by relative L1; the sums are all-reduced over
every group the activations are split on, and so is the decision itself (a step is skipped only
where every rank may skip it), so no rank's host state (threshold, warmup, skip cap, session) can
send ranks down different branches, where one would wait forever in the other's collectives. Then a single
``torch.ops.higher_order.cond`` either runs the middle blocks (the *region*) and returns their
residual, or adds the residual stored from the last computed step. The last ``compute_last``
blocks always run.

The cache state is not held in the graph: it enters as extra inputs and leaves as extra
outputs, so the runtime (:mod:`para_fx.runtime.cache`) owns it per call context, and under context
parallelism each rank holds exactly its shard (the state has the activations' local shapes).

The graph's extra inputs and outputs are written once, in :class:`CacheLayout`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
from typing import Callable, Sequence

import torch
import torch.distributed._functional_collectives as funcol
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
import torch.fx as fx

from para_fx.inspect.report import Report, module_path

from .blocks import Block, find_blocks
from .shard_rules import family

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Shape, dtype and device of one cached tensor (this rank's shard)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """One call's extra outputs, by name."""

    outputs: tuple  # the model's own outputs
    prefix: list  # the prefix residuals to compare the next step with: this step's if computed, else the stored
    region: list  # the cached blocks' residuals (the next step's region state)
    consecutive: object  # skips in a row up to this step (the next step's count)
    diff: object  # relative L1 change of the prefix residual, agreed by every rank
    skipped: object  # whether the cond skipped the cached blocks, agreed by every rank


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The cache graph's signature, the one place that orders its extra inputs and outputs::

        inputs:  *user_inputs, *prefix_state, *region_state, consecutive_skips, allow_skip, threshold, max_skips
        outputs: *user_outputs, *prefix_state, *region_state, consecutive_skips, diff, skipped

    The state (the prefix residual to compare with, the cached blocks' residual, the count of
    skips in a row) goes out as the next call's state: the graph itself keeps the stored prefix
    on a skip and counts the skips, so the runtime never reads a decision back to the host.
    The pass emits the graph through it and the runtime calls the graph through it.
    """

    user_outputs: int
    prefix_state: tuple[StateSpec, ...]
    region_state: tuple[StateSpec, ...]

    def inputs(self, user: Sequence, prefix: Sequence, region: Sequence, consecutive, allow, threshold, max_skips) -> list:
        return [*user, *prefix, *region, consecutive, allow, threshold, max_skips]

    def outputs(self, user: Sequence, prefix: Sequence, region: Sequence, consecutive, diff, skipped) -> tuple:
        return (*user, *prefix, *region, consecutive, diff, skipped)

    def split(self, outs: Sequence) -> CacheStep:
        n, k, m = self.user_outputs, len(self.prefix_state), len(self.region_state)
        return CacheStep(
            tuple(outs[:n]), list(outs[n : n + k]), list(outs[n + k : n + k + m]), outs[-3], outs[-2], outs[-1]
        )

    def scalar(self, value: float | bool) -> torch.Tensor:
        """A scalar input (the skip count, a flag or a limit) on the state's device."""
        dtype = torch.bool if isinstance(value, bool) else torch.float32
        return torch.tensor(value, dtype=dtype, device=self.prefix_state[0].device)

    def example_inputs(self, user: Sequence) -> list:
        """Inputs to trace the cache graph with: empty state, skipping not allowed."""
        return self.inputs(
            user,
            [spec.zeros() for spec in self.prefix_state],
            [spec.zeros() for spec in self.region_state],
            self.scalar(0.0),
            self.scalar(False),
            self.scalar(0.0),
            self.scalar(math.inf),
        )


@dataclasses.dataclass
class CacheRegion:
    """For the report (rendered as a table there): which blocks always run, which the cond may skip, what is cached."""

    computed_first: list[str]
    skippable: list[str]
    computed_last: list[str]
    streams: list[str]  # "made in -> read in [shape]" per cached residual, by module path
    decision: list[str]  # the same, per residual compared between steps


def insert_first_block_cache(
    gm: fx.GraphModule, compute_first: int, compute_last: int, groups: list[str], report: Report
) -> tuple[fx.GraphModule, CacheLayout] | None:
    """Rewrite ``gm`` (an aten graph with ``meta["val"]``) to cache its middle blocks; None if it cannot."""
    nodes = list(gm.graph.nodes)
    blocks = find_blocks(gm.graph)
    report.blocks = [b.name for b in blocks]
    if len(blocks) < compute_first + compute_last + 1:
        report.notes.append(
            f"first block cache not applied: {len(blocks)} transformer blocks found in this graph, "
            f"needs more than compute_first + compute_last = {compute_first + compute_last}"
        )
        return None
    split = _split(nodes, blocks, compute_first, compute_last)
    problem = split.problem()
    if problem:
        report.notes.append(f"first block cache not applied: {problem}")
        return None

    region_pairs = [(_residual_source(out, split.region, split.prefix_outputs), out) for out in split.outputs]
    prefix_pairs = _decision_streams(split, nodes.index)
    if not prefix_pairs:
        report.notes.append("first block cache not applied: the first blocks pass no floating-point value on")
        return None
    new_gm, layout = _rewrite(gm, split, region_pairs, prefix_pairs, groups)
    report.cache = CacheRegion(
        computed_first=[b.name for b in blocks[:compute_first]],
        skippable=[b.name for b in blocks[compute_first : len(blocks) - compute_last]],
        computed_last=[b.name for b in blocks[len(blocks) - compute_last :]],
        streams=[_stream(src, out) for src, out in region_pairs],
        decision=[_stream(src, out) for src, out in prefix_pairs],
    )
    return new_gm, layout


def _stream(src: fx.Node | None, out: fx.Node) -> str:
    """``made in -> read from [shape]``, by module path: graph node names mean nothing to a reader."""
    shape = "x".join(map(str, out.meta["val"].shape))
    where = lambda node: module_path(node) or "the model's forward"
    return f"{where(src) if src is not None else '(none: the value itself)'} -> {where(out)} [{shape}]"


@dataclasses.dataclass
class _Split:
    prefix: set[fx.Node]  # nodes of the always-computed first blocks
    region: list[fx.Node]  # nodes that move into the cond, in graph order
    inputs: list[fx.Node]  # values the region reads from outside
    outputs: list[fx.Node]  # region values read after it
    prefix_inputs: set[fx.Node]  # values computed before the first block, and slices of them
    insert_before: fx.Node  # the first node after the region

    @property
    def prefix_outputs(self) -> set[fx.Node]:
        return {n for n in self.inputs if n in self.prefix}

    def problem(self) -> str | None:
        for node in self.inputs + self.outputs:
            if not isinstance(node.meta.get("val"), torch.Tensor):
                return f"value {node.name} crossing the cached region is not a tensor"
        if not self.prefix_outputs:
            return "the cached blocks do not read the first blocks' outputs"
        if not self.outputs:
            return "nothing after the cached blocks reads their result"
        return None


def _split(nodes: list[fx.Node], blocks: list[Block], compute_first: int, compute_last: int) -> _Split:
    """Partition the graph: what the cond holds, what it reads, what reads it.

    The region is every node between the prefix and the suffix blocks that depends on the
    prefix, plus the nodes only the region uses (per-block modulation from the timestep, say),
    so a skipped step computes none of them. Other nodes there are left in front of the cond.
    """
    start = blocks[compute_first - 1].last + 1
    stop = blocks[len(blocks) - compute_last].first if compute_last else blocks[-1].last + 1
    prefix = {n for n in nodes[blocks[0].first : start] if n.op == "call_function"}
    span = [n for n in nodes[start:stop] if n.op == "call_function"]

    depends: set[fx.Node] = set()
    for node in span:
        if any(arg in prefix or arg in depends for arg in node.all_input_nodes):
            depends.add(node)
    region = set(depends)
    for node in reversed(span):
        if node not in region and node.users and all(user in region for user in node.users):
            region.add(node)

    ordered = [n for n in span if n in region]
    inputs = list(dict.fromkeys(arg for n in ordered for arg in n.all_input_nodes if arg not in region))
    outputs = [n for n in ordered if any(user not in region for user in n.users)]
    return _Split(
        prefix=prefix,
        region=ordered,
        inputs=inputs,
        outputs=outputs,
        prefix_inputs=_before_blocks(nodes, blocks[0].first, start),
        insert_before=nodes[stop],
    )


# families (see shard_rules.family) of the ops that pass a value's pieces on and compute nothing
_MOVES = ("slice", "join", "reshape", "copy")


def _before_blocks(nodes: list[fx.Node], first: int, start: int) -> set[fx.Node]:
    """What the first block receives: values from before it, and the pieces of them it takes
    (the shard pass slices a replicated stream where its first block starts)."""
    found = set(nodes[:first])
    for node in nodes[first:start]:
        if family(node.target) in _MOVES and node.all_input_nodes and all(arg in found for arg in node.all_input_nodes):
            found.add(node)
    return found


def _residual_source(out: fx.Node, members, candidates: set[fx.Node]) -> fx.Node | None:
    """The input whose residual stream leads to ``out``: same shape and dtype, nearest back.

    First along nodes of ``out``'s own shape (a plain residual stream), then through any node
    (streams that are concatenated and split inside blocks, like single-stream blocks).
    """
    want = (tuple(out.meta["val"].shape), out.meta["val"].dtype)
    members = set(members)
    same_shape = lambda n: isinstance(n.meta.get("val"), torch.Tensor) and (
        tuple(n.meta["val"].shape),
        n.meta["val"].dtype,
    ) == want
    for walk_only_same_shape in (True, False):
        seen, queue = {out}, collections.deque([out])
        while queue:
            for arg in queue.popleft().all_input_nodes:
                if arg in seen:
                    continue
                seen.add(arg)
                if arg in candidates and same_shape(arg):
                    return arg
                if arg in members and (same_shape(arg) or not walk_only_same_shape):
                    queue.append(arg)
    return None


def _decision_streams(split: _Split, position: Callable[[fx.Node], int]) -> list[tuple[fx.Node | None, fx.Node]]:
    """(prefix input, prefix output) per floating stream the region reads; residual streams first."""
    outputs = sorted(
        (n for n in split.prefix_outputs if n.meta["val"].is_floating_point()),
        key=position,
    )
    pairs = [(_residual_source(out, split.prefix, split.prefix_inputs), out) for out in outputs]
    residual = [(src, out) for src, out in pairs if src is not None]
    return residual or pairs


def _rewrite(gm, split: _Split, region_pairs, prefix_pairs, groups):
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    region = set(split.region)
    old_nodes = list(gm.graph.nodes)
    last_placeholder = max(i for i, n in enumerate(old_nodes) if n.op == "placeholder")
    output = old_nodes[-1].args[0]
    user = list(output) if isinstance(output, (tuple, list)) else [output]
    spec = lambda node: StateSpec(tuple(node.meta["val"].shape), node.meta["val"].dtype, node.meta["val"].device)
    layout = CacheLayout(
        user_outputs=len(user),
        prefix_state=tuple(spec(out) for _, out in prefix_pairs),
        region_state=tuple(spec(out) for _, out in region_pairs),
    )

    prefix_state, region_state, scalars = [], [], []
    for i, node in enumerate(old_nodes):
        if node is split.insert_before:
            region_outs, region_residuals, prefix_kept, consecutive, diff, skipped = _emit_cond(
                graph, gm, env, split, region_pairs, prefix_pairs, prefix_state, region_state, scalars, groups
            )
            env.update(zip(split.outputs, region_outs))
        if node in region:
            continue
        if node.op == "output":
            user_values = fx.map_arg(user, env.__getitem__)
            graph.output(layout.outputs(user_values, prefix_kept, region_residuals, consecutive, diff, skipped))
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
        if i == last_placeholder:  # the extra inputs follow the user's, in the layout's order
            prefix_state = [_placeholder(graph, f"cache_prefix_{k}", out) for k, (_, out) in enumerate(prefix_pairs)]
            region_state = [_placeholder(graph, f"cache_region_{k}", out) for k, (_, out) in enumerate(region_pairs)]
            scalars = [graph.placeholder(f"cache_{name}") for name in ("consecutive_skips", "allow_skip", "threshold", "max_skips")]

    return fx.GraphModule(gm, graph), layout


def _placeholder(graph: fx.Graph, name: str, like: fx.Node) -> fx.Node:
    node = graph.placeholder(name)
    node.meta["val"] = like.meta["val"]
    node.meta.setdefault("_dynamo_source", None)
    return node


def _emit_cond(graph, gm, env, split, region_pairs, prefix_pairs, prefix_state, region_state, scalars, groups):
    """The decision and the cond, in the main graph; returns the new nodes for what they replace."""
    prefix_ins = [env[src] if src is not None else None for src, _ in prefix_pairs]
    prefix_outs = [env[out] for _, out in prefix_pairs]
    decision = graph.call_function(decide, (prefix_outs, prefix_ins, list(prefix_state), *scalars, list(groups)))
    k = len(prefix_pairs)
    prefix_kept, (consecutive, diff, skipped) = (
        [graph.call_function(operator.getitem, (decision, i)) for i in range(k)],
        [graph.call_function(operator.getitem, (decision, k + i)) for i in range(3)],
    )

    operands = [_fixed_layout(graph, env[n], n) for n in split.inputs] + list(region_state)
    gm.cache_skip = _branch(split, region_pairs, compute=False)
    gm.cache_compute = _branch(split, region_pairs, compute=True)
    skip_fn = graph.get_attr("cache_skip")
    compute_fn = graph.get_attr("cache_compute")
    cond = graph.call_function(torch.ops.higher_order.cond, (skipped, skip_fn, compute_fn, tuple(operands)))
    results = [graph.call_function(operator.getitem, (cond, k)) for k in range(2 * len(region_pairs))]
    return results[: len(region_pairs)], results[len(region_pairs) :], prefix_kept, consecutive, diff, skipped


def _branch(split: _Split, region_pairs, compute: bool) -> fx.GraphModule:
    """One side of the cond: (*region inputs, *stored residuals) -> (*region outputs, *residuals).

    Both sides must return dense tensors with equal strides, so views are copied out.
    """
    graph = fx.Graph()
    env = {n: graph.placeholder(n.name) for n in split.inputs}
    stored = [graph.placeholder(f"stored_{k}") for k in range(len(region_pairs))]
    outs, residuals = [], []
    if compute:
        for node in split.region:
            env[node] = graph.node_copy(node, env.__getitem__)
        for src, out in region_pairs:
            value = _dense(graph, env[out], out)
            outs.append(value)
            residuals.append(
                graph.call_function(aten.sub.Tensor, (value, _dense(graph, env[src], src)))
                if src is not None
                else graph.call_function(aten.clone.default, (value,))
            )
    else:
        for (src, _), kept in zip(region_pairs, stored):
            outs.append(
                graph.call_function(aten.add.Tensor, (_dense(graph, env[src], src), kept))
                if src is not None
                else graph.call_function(aten.clone.default, (kept,))
            )
            residuals.append(graph.call_function(aten.clone.default, (kept,)))
    graph.output(tuple(outs + residuals))
    return fx.GraphModule(torch.nn.Module(), graph)


def _dense(graph: fx.Graph, value: fx.Node, like: fx.Node) -> fx.Node:
    """``value`` itself if ``like`` has the strides of a fresh contiguous tensor, else such a copy."""
    val = like.meta["val"]
    if list(val.stride()) == _contiguous_strides(val.shape) and val.storage_offset() == 0:
        return value
    return graph.call_function(aten.clone.default, (value,), {"memory_format": torch.contiguous_format})


def _fixed_layout(graph: fx.Graph, value: fx.Node, like: fx.Node) -> fx.Node:
    """A cond operand whose strides Inductor must honour.

    Inductor compiles each branch for the strides of its operands' fake values but may lay an
    intermediate buffer out otherwise; forcing the contiguous order pins both (a copy only where
    the value is not already laid out so). Graph inputs already arrive with their strides.
    """
    if like.op == "placeholder":
        return value
    return graph.call_function(
        torch.ops.prims.inductor_force_stride_order.default, (value, _contiguous_strides(like.meta["val"].shape))
    )


def _contiguous_strides(shape) -> list[int]:
    strides, stride = [], 1
    for size in reversed(shape):
        strides.insert(0, stride)
        stride *= size
    return strides


def decide(prefix_outs, prefix_ins, previous, consecutive, allow, threshold, max_skips, groups):
    """Whether to skip, one answer on every rank, and the state the next step compares with.

    The change is summed over every group, and so is the decision: a step is skipped only where
    every rank may skip it (``allow``: the runtime's warmup and threshold; fewer than
    ``max_skips`` skips in a row), and sees a relative L1 change below ``threshold``, so ranks
    whose host state differs still take the same branch. Returns the prefix residuals to keep
    (a skip keeps comparing against the last computed step's), the new count of skips in a row,
    the change and the decision: all on the device, so nothing here waits for the GPU.
    """
    # contiguous: the residuals come back as the next step's state inputs, whose strides must not vary
    residuals = [(out - src if src is not None else out).contiguous() for out, src in zip(prefix_outs, prefix_ins)]
    change = sum((r.float() - p.float()).abs().sum() for r, p in zip(residuals, previous))
    scale = sum(p.float().abs().sum() for p in previous)
    sums = torch.stack([change, scale])
    for group in groups:
        sums = funcol.all_reduce(sums, "sum", group)
    diff = sums[0] / sums[1]
    skip = (allow & (diff < threshold) & (consecutive < max_skips)).float()
    for group in groups:
        skip = funcol.all_reduce(skip, "min", group)
    skipped = skip > 0
    kept = [torch.where(skipped, p, r) for r, p in zip(residuals, previous)]
    return (*kept, torch.where(skipped, consecutive + 1, 0.0), diff, skipped)
