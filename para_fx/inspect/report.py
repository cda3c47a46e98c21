"""What the passes did to a graph, as plain records: attention sites, fallbacks, collectives, and
each pass's graph; ``str(report)`` prints them as tables, ``save_html`` as one self-contained page.

Both open with a verdict, for the reader asking "why is my model not faster": whether the
attention runs split over the ranks, each cause that keeps it (or other work) whole once, with
the model's source line and what to do, and the communication per step against the minimum.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from . import dump
from .html import render_report
from ..core.placement import PLACEMENT_LEGEND
from ..passes.blocks import find_blocks
from ..passes.shard_rules import family
from .dump import NodeRow, is_collective, module_path, source_line  # noqa: F401  (module_path, source_line: used by the passes)

log = logging.getLogger("para_fx")


@dataclasses.dataclass
class AttentionSite:
    module: str
    strategy: str  # "ulysses", "ring", "hybrid", "local", "replicated", "batch"
    local_query_len: int
    global_query_len: int
    placements: str = ""


@dataclasses.dataclass
class Fallback:
    op: str
    reason: str
    source: str
    module: str = ""


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: int  # what it returns on this rank, per call
    module: str = ""
    site: int | None = None  # index in Report.attention_sites of the attention that issued it


@dataclasses.dataclass
class PassGraph:
    """A graph after one pass: its code, one row per node, and this rank's FLOPs (matmuls, attention)."""

    name: str
    code: str  # GraphModule.code
    rows: list[NodeRow]
    flops: int
    # wall time since the graph before it (the capture, for "captured"): the pass's cost
    seconds: float = dataclasses.field(default=0.0, compare=False)


@dataclasses.dataclass
class CompiledGraph:
    """One graph the backend compiled, pass by pass; ``name`` numbers it in this process (dump files)."""

    name: str
    passes: list[PassGraph] = dataclasses.field(default_factory=list)
    # the inner compiler's (Inductor's) share of the compile
    inner_compile_seconds: float | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class RunContext:
    """What was explained, on what (set by ``explain``): the report's first lines."""

    model: str
    world_size: int
    batch: int
    ring: int
    ulysses: int
    rank: int
    simulated: bool
    inputs: list[str]  # "hidden_states f32[1, 35, 16]", in call order
    versions: str  # "torch 2.13.0, para-fx 0.1.0"

    def lines(self) -> list[str]:
        if self.world_size == 1:
            where = "one device"
        else:
            mesh = f"batch {self.batch} x ring {self.ring} x ulysses {self.ulysses}"
            where = f"rank {self.rank} of {self.world_size} ({mesh}{', simulated' if self.simulated else ''})"
        return [f"model: {self.model} on {where}; {self.versions}", "inputs: " + (", ".join(self.inputs) or "(none)")]


@dataclasses.dataclass
class Cause:
    """One reason part of the model runs whole on every rank, with every place it occurs."""

    what: str
    source: str
    modules: list[str]
    in_blocks: bool
    advice: str

    def lines(self) -> list[str]:
        where = ", ".join(m or "the model's forward" for m in dict.fromkeys(self.modules))
        cost = "inside the transformer blocks: it costs in every block" if self.in_blocks else "outside the blocks: once per step"
        times = f"{len(self.modules)} times" if len(self.modules) > 1 else "once"
        lines = [self.what, f"in {where} ({times}; {cost})", f"what to do: {self.advice}"]
        return lines if not self.source else [lines[0], f"at {self.source}", *lines[1:]]


# What each fallback reason asks of the model's author; the first key found in the reason wins.
_ADVICE = {
    "dropout": "context parallelism splits attention without dropout (call the model in eval mode)",
    "attention mask": "pass a boolean key mask that broadcasts as [B, 1 or H, 1 or S_q, S_kv]",
    "log-sum-exp": "only the attention's output can be split; code reading its log-sum-exp runs on full tensors",
    "view": "a reshape that splits the sequence into factors (height x width) the ranks' chunks do not follow; "
    "outside the blocks (the final unpatchify) this is the gather the output needs anyway",
    "over the sharded dim": "this op reduces over the tokens: if it is attention written by hand, call "
    "F.scaled_dot_product_attention so that para-fx can split it",
}
_GENERIC_ADVICE = {
    True: "the sharded value is gathered before this op in every block: write the line with ops para-fx splits "
    "(pointwise, views that keep the token dim, matmuls, norms and reductions over other dims), or move it out of the blocks",
    False: "one gather per step outside the blocks; worth changing only if the value is large",
}
SPLIT_STRATEGIES = ("ulysses", "ring", "hybrid", "local")
@dataclasses.dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclasses.dataclass
class Report:
    attention_sites: list[AttentionSite] = dataclasses.field(default_factory=list)
    fallbacks: list[Fallback] = dataclasses.field(default_factory=list)
    collectives: list[Collective] = dataclasses.field(default_factory=list)
    graphs: dict[str, str] = dataclasses.field(default_factory=dict)  # pass name -> readable code
    notes: list[str] = dataclasses.field(default_factory=list)
    fused_projections: list[int] = dataclasses.field(default_factory=list)  # matmuls in each fused group
    shared_blocks: dict[str, str] = dataclasses.field(default_factory=dict)  # block -> its shared subgraph's identifier
    graph_count: int = 0  # graphs Dynamo handed to the backend: more than one means graph breaks
    blocks: list[str] = dataclasses.field(default_factory=list)  # transformer blocks found
    cache: Any = None  # the First Block Cache region (passes.cache.CacheRegion), None if not applied
    compiled: list[CompiledGraph] = dataclasses.field(default_factory=list)
    world_size: int = 1  # ranks the mesh spans (set by explain): what the FLOPs estimate divides by
    context: RunContext | None = None  # the model, mesh, inputs and versions (set by explain)
    # when the last graph was recorded: what the next one's seconds count from
    _clock: float = dataclasses.field(default_factory=time.perf_counter, repr=False, compare=False)

    def add_graph(self, name: str, graph: fx.GraphModule) -> None:
        """Record the graph after the pass ``name``; dump it when ``PARA_FX_DUMP_DIR`` is set."""
        if not self.compiled:
            self.compiled.append(CompiledGraph(dump.next_graph_name()))
        record = self.compiled[-1]
        now = time.perf_counter()
        step = PassGraph(name, graph.code, dump.node_rows(graph), graph_flops(graph), seconds=now - self._clock)
        previous = record.passes[-1] if record.passes else None
        record.passes.append(step)
        self.graphs[name] = step.code
        if name == "captured" and not self.blocks:
            self.blocks = [b.name for b in find_blocks(graph.graph)]
        collectives = sum(r.collective for r in step.rows)
        log.debug("para_fx: %s after %s: %d nodes, %d collectives", record.name, name, len(step.rows), collectives)
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"para_fx_{record.name}_{name}", "encoding": "string"},
            payload_fn=lambda: dump.render(step.rows),
            expect_trace_id=False,
        )
        folder = dump.dump_dir()
        if folder is not None:
            before = (previous.name, previous.rows) if previous else None
            dump.write_pass(folder, record.name, len(record.passes) - 1, name, step.rows, before)
        self._clock = time.perf_counter()

    def extend(self, other: "Report") -> None:
        offset = len(self.attention_sites)
        self.collectives.extend(
            dataclasses.replace(c, site=None if c.site is None else c.site + offset) for c in other.collectives
        )
        for field in ("attention_sites", "fallbacks", "notes", "compiled", "fused_projections"):
            getattr(self, field).extend(getattr(other, field))
        self.blocks = self.blocks or other.blocks
        self.cache = self.cache or other.cache
        self.shared_blocks.update(other.shared_blocks)
        self.world_size = max(self.world_size, other.world_size)
        prefix = f"graph{self.graph_count}_" if self.graph_count else ""
        self.graphs.update({prefix + k: v for k, v in other.graphs.items()})
        self.graph_count += other.graph_count

    def compile_seconds(self) -> dict[str, float]:
        """Wall seconds of each step of the backend's compiles, summed over the graphs: the capture
        ("captured"), each pass, and the inner compiler. What is missing from a first call's time
        is Dynamo's own (bytecode tracing, guards). Not part of ``str(report)``: it varies by run."""
        seconds: dict[str, float] = {}
        for record in self.compiled:
            for step in record.passes:
                seconds[step.name] = seconds.get(step.name, 0.0) + step.seconds
            if record.inner_compile_seconds is not None:
                seconds["inner compiler"] = seconds.get("inner compiler", 0.0) + record.inner_compile_seconds
        return seconds

    # -- the graphs --------------------------------------------------------------------------

    def passes(self) -> dict[str, PassGraph]:
        """Every pass of every graph, by the keys of ``graphs`` (``shard_seq``, ``graph1_shard_seq``)."""
        return {key: step for key, step, _ in self.pass_sequence()}

    def pass_sequence(self) -> list[tuple[str, PassGraph, str | None]]:
        """``(key, pass, key of the pass before in the same graph or None)``, in compilation order."""
        sequence = []
        for i, record in enumerate(self.compiled):
            prefix = f"graph{i}_" if i else ""
            for j, step in enumerate(record.passes):
                sequence.append((prefix + step.name, step, prefix + record.passes[j - 1].name if j else None))
        return sequence

    def graph_text(self, name: str, module: str | None = None) -> str:
        """The graph after pass ``name`` (a key of ``graphs``), one annotated line per node,
        only the nodes made inside ``module`` (a module path) if given."""
        return dump.render(self._pass(name).rows, module)

    def graph_diff(self, before: str, after: str) -> str:
        """A unified diff of the graphs after two passes (keys of ``graphs``), node names dropped."""
        return dump.diff(self._pass(before).rows, self._pass(after).rows, before, after)

    def _pass(self, name: str) -> PassGraph:
        passes = self.passes()
        if name not in passes:
            raise KeyError(f"no graph after a pass named {name!r}; the report has {list(passes)}")
        return passes[name]

    # -- tables ------------------------------------------------------------------------------

    def site_collectives(self, index: int) -> list[Collective]:
        return [c for c in self.collectives if c.site == index]

    def tables(self) -> list[Table]:
        """The report as titled tables (``str`` and ``save_html`` both render these)."""
        sites = []
        for i, s in enumerate(self.attention_sites):
            by_kind: dict[str, list[int]] = {}
            for c in self.site_collectives(i):
                by_kind.setdefault(c.kind, []).append(c.bytes)
            per_call = ", ".join(f"{kind} x{len(sizes)} ({format_bytes(sum(sizes))})" for kind, sizes in by_kind.items()) or "-"
            why = "" if s.strategy in SPLIT_STRATEGIES else self._why_whole(s)
            sites.append([s.module, s.strategy, f"{s.local_query_len}/{s.global_query_len}", s.placements, per_call, why])
        total = sum(c.bytes for c in self.collectives)
        fallbacks = [
            [f.op, f.reason, f.source, str(len(group)), ", ".join(dict.fromkeys(g.module or "-" for g in group))]
            for f, group in self._fallback_groups()
        ]
        tables = [
            Table("verdict", [], [[line] for line in self.verdict()]),
            Table(f"blocks ({len(self.blocks)})", ["#", "block"], [[str(i), b] for i, b in enumerate(self.blocks)]),
            Table(
                f"attention sites ({len(self.attention_sites)}, {len(self.split_sites())} split over the ranks)",
                ["module", "strategy", "query len (local/global)", "placements", "collectives per call", "why whole"],
                sites,
            ),
            Table(
                f"fallbacks ({len(self.fallbacks)}; {len(self.fallbacks_in_blocks())} inside the blocks, listed first)",
                ["op", "reason", "source", "times", "modules"],
                fallbacks,
            ),
            Table(
                f"collectives ({len(self.collectives)}, {total / 2**20:.2f} MiB per call)",
                ["kind", "bytes", "module"],
                [[c.kind, str(c.bytes), c.module] for c in self.collectives],
            ),
        ]
        if self.cache is not None:
            tables.append(self._cache_table())
        return tables + [Table("summary", [], self.summary())]

    def _cache_table(self) -> Table:
        c = self.cache
        parts = [
            ("always computed first", c.computed_first),
            ("inside torch.cond, skipped on a cache hit", c.skippable),
            ("always computed last", c.computed_last),
        ]
        rows = [[part, str(len(blocks)), _names(blocks)] for part, blocks in parts]
        rows += [["cached residuals (made in -> read in)", str(len(c.streams)), "; ".join(c.streams) or "-"]]
        rows += [["compared between steps", str(len(c.decision)), "; ".join(c.decision)]]
        total = sum(len(blocks) for _, blocks in parts)
        return Table(f"first block cache (one torch.cond per step; {len(c.skippable)} of {total} blocks skippable)", ["part", "count", "which"], rows)

    # -- the verdict -------------------------------------------------------------------------

    def split_sites(self) -> list[AttentionSite]:
        """Attention sites whose queries are split over the ranks (with or without communication)."""
        return [s for s in self.attention_sites if s.strategy in SPLIT_STRATEGIES]

    def _fallback_groups(self) -> list[tuple[Fallback, list[Fallback]]]:
        """Fallbacks with the same op, reason and source line as one cause, those inside the blocks first."""
        groups: dict[tuple[str, str, str], list[Fallback]] = {}
        for f in self.fallbacks_by_cost():
            groups.setdefault((f.op, f.reason, f.source), []).append(f)
        return [(group[0], group) for group in groups.values()]

    def _why_whole(self, site: AttentionSite) -> str:
        reasons = [f.reason for f in self.fallbacks if f.module == site.module and "attention" in f.op]
        if reasons:
            return f"q/k/v gathered: {reasons[0]}"
        return "its query is not split along the tokens"

    def causes(self) -> list[Cause]:
        """Each reason part of the model runs whole on every rank, once, the costliest first."""
        causes = []
        for f, group in self._fallback_groups():
            inside = self.in_blocks(f.module)
            advice = next((a for key, a in _ADVICE.items() if key in f.reason), _GENERIC_ADVICE[inside])
            causes.append(Cause(f"{f.op}: {f.reason}", f.source, [g.module for g in group], inside, advice))
        unexplained = [s for s in self.attention_sites if s.strategy not in SPLIT_STRATEGIES and "gathered" not in self._why_whole(s)]
        if unexplained and self.world_size > 1:
            causes.append(Cause(
                f"attention runs whole on every rank: its query is not split along the tokens ({unexplained[0].placements})",
                "", [s.module for s in unexplained], any(self.in_blocks(s.module) for s in unexplained),
                "the token dim was lost before the attention: report.graph_text('shard_seq', module) shows each "
                "value's placement; a reshape that merges the token dim with another one is the usual culprit",
            ))
        if self.graph_count > 1:
            causes.append(Cause(
                f"Dynamo split the model into {self.graph_count} graphs: code between them (attention included) runs on full tensors",
                "", [], True,
                "find the breaks with torch._dynamo.explain(model)(**inputs); for diffusers models, "
                "para_fx.adapters.diffusers.make_traceable removes the known ones",
            ))
        return sorted(causes, key=lambda c: (not c.in_blocks, -len(c.modules)))

    def verdict(self) -> list[str]:
        """The answer first: parallel or not, what keeps work whole (each cause once), communication against the minimum."""
        headline, causes, after = self.verdict_parts()
        lines = [headline]
        if causes:
            lines.append(f"what keeps work whole on every rank ({len(causes)} cause{'s' if len(causes) > 1 else ''}, costliest first):")
            for i, cause in enumerate(causes, 1):
                first, *rest = cause.lines()
                lines += [f"{i}. {first}", *(f"   {line}" for line in rest)]
        elif self.world_size > 1:
            lines.append("nothing falls back: every op runs on its shard")
        return lines + after

    def verdict_parts(self) -> tuple[str, list[Cause], list[str]]:
        """(parallel or not, the causes, the lines after them: communication, cache), for ``verdict`` and the HTML page."""
        batch = self.context.batch if self.context else 1
        split, total = len(self.split_sites()), len(self.attention_sites)
        how = ", ".join(sorted({s.strategy for s in self.split_sites()}))
        if self.world_size == 1:
            headline = "parallel: no, one device (explain with world_size=N to see N ranks)"
        elif not total and batch > 1:
            headline = f"parallel: the batch is split over {batch} ranks (CFG); the tokens are not split"
        elif total and split == total:
            headline = f"parallel: yes, all {total} attention sites split the tokens over the ranks ({how})"
        elif split:
            headline = f"parallel: partly, {split} of {total} attention sites split the tokens ({how}); {total - split} run whole on every rank"
        else:
            headline = f"parallel: no, none of the {total} attention sites splits the tokens: every rank computes every attention whole"
        after = []
        moved, needed = self.communication()
        if self.world_size > 1 and needed:
            after.append(
                f"communication per step: {format_bytes(moved)}, {moved / needed:.2f}x the {format_bytes(needed)} "
                "the attention sites need (the rest: gathers and reductions outside the attention)"
            )
        elif self.world_size > 1:
            after.append(f"communication per step: {format_bytes(moved)}, none of it for a split attention")
        after += [f"first block cache: {n.removeprefix('first block cache ')}" for n in self.notes if n.startswith("first block cache")]
        return headline, self.causes(), after

    def communication(self) -> tuple[int, int]:
        """Bytes moved per step, and the part the attention sites' own transport needs."""
        return sum(c.bytes for c in self.collectives), sum(c.bytes for c in self.collectives if c.site is not None)

    def in_blocks(self, module: str) -> bool:
        """Whether a module path lies inside one of the transformer blocks (where a gather repeats per block)."""
        return any(module == b or module.startswith(b + ".") for b in self.blocks)

    def fallbacks_in_blocks(self) -> list[Fallback]:
        return [f for f in self.fallbacks if self.in_blocks(f.module)]

    def fallbacks_by_cost(self) -> list[Fallback]:
        """Fallbacks inside the blocks first: they gather once per block, the others once per step."""
        return sorted(self.fallbacks, key=lambda f: not self.in_blocks(f.module))

    def summary(self) -> list[list[str]]:
        total, needed = self.communication()
        rows = [
            ["graphs compiled", str(self.graph_count)],
            ["fallbacks", f"{len(self.fallbacks_in_blocks())} inside the transformer blocks, {len(self.fallbacks)} in all"],
            ["collectives per step", f"{len(self.collectives)} ({format_bytes(total)})"],
            [
                "communication against the minimum",
                f"{format_bytes(total)} moved, {format_bytes(needed)} of it by the attention sites' own transport"
                + (f" ({total / needed:.2f}x)" if needed else ""),
            ],
        ]
        if self.fused_projections:
            rows.append(["projections fused", f"{sum(self.fused_projections)} matmuls into {len(self.fused_projections)}"])
        if self.shared_blocks:
            distinct = len(set(self.shared_blocks.values()))
            rows.append(["blocks shared", f"{len(self.shared_blocks)} blocks as calls of {distinct} distinct subgraphs"])
        single = sum(g.passes[0].flops for g in self.compiled if g.passes)
        local = sum(g.passes[-1].flops for g in self.compiled if g.passes)
        if single:
            rows.append(["FLOPs per step (matmul, attention)", f"{format_flops(local)} per rank, {format_flops(single)} on one device"])
        if single and self.world_size > 1:
            # local = (1 - f) * single + f * single / world: the fraction f that runs split over the ranks.
            fraction = (single - local) / (single * (1 - 1 / self.world_size))
            caveat = "" if self.split_sites() or not self.attention_sites else " (matmuls only: no attention is split)"
            rows.append(["FLOPs sharded (estimate)", f"{min(max(fraction, 0.0), 1.0):.0%} over {self.world_size} ranks{caveat}"])
        return rows

    def __str__(self) -> str:
        lines = self.context.lines() if self.context else []
        for table in self.tables():
            if not table.header:  # the verdict and the summary: one line per row
                lines.append(f"{table.title}:")
                lines += ["  " + ": ".join(row) for row in table.rows]
                continue
            lines.append(f"{table.title}:")
            lines += _table(table.header, table.rows)
            if table.title.startswith("attention sites") and table.rows:
                lines.append(f"  ({PLACEMENT_LEGEND})")
        if self.graph_count > 1:
            lines.append(
                f"note: Dynamo split the model into {self.graph_count} graphs; code between graphs "
                "(attention included) runs unsharded on full tensors"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def save_html(self, path: str) -> None:
        """One self-contained HTML page: the tables and every pass's graph, coloured by placement."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_report(self))


def _names(blocks: list[str]) -> str:
    if len(blocks) <= 4:
        return ", ".join(blocks) or "-"
    return f"{blocks[0]}, {blocks[1]} ... {blocks[-1]}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return [fmt(header)] + [fmt(r) for r in rows]


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_flops(n: int) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1000 or unit == "T":
            return f"{n:.3g} {unit}FLOP"
        n /= 1000
    raise AssertionError("unreachable")


def collectives_of(graph: fx.GraphModule) -> list[Collective]:
    """Every collective a graph issues per call (waits excluded), with the bytes it returns,
    including those inside subgraphs (the branches of a ``torch.cond``)."""
    found = []
    for gm in graph.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if not is_collective(node):
                continue
            v = node.meta.get("val")
            size = v.numel() * v.element_size() if v is not None else 0
            site = (node.meta.get("custom") or {}).get("para_site")
            found.append(Collective(node.target.__name__.split(".")[0], size, module_path(node), site))
    return found


def graph_flops(gm: fx.GraphModule) -> int:
    """FLOPs of a graph's matmuls, convolutions and attentions, from the static shapes on its nodes;
    for an op with subgraphs (``torch.cond``), the costlier branch."""
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        branches = [getattr(gm, a.target) for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        branches = [b for b in branches if isinstance(b, fx.GraphModule)]
        if branches and family(node.target) != "attention":  # flex attention's subgraphs are its score_mod
            total += max(graph_flops(b) for b in branches)
        else:
            total += node_flops(node)
    return total


def attention_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> int:
    """Scores and weighted sum, 2 FLOPs per multiply-add; grouped-query keys count once per query
    head (torch 2.11's own formula rejects them)."""
    *batch, query_len, head_dim = query
    return 2 * math.prod(batch) * query_len * key[-2] * (head_dim + value[-1])


def node_flops(node: fx.Node) -> int:
    packet = getattr(node.target, "overloadpacket", None)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    if family(node.target) == "attention":  # every SDPA kernel op: query, key, value come first
        return attention_flops(args[0].shape, args[1].shape, args[2].shape)
    formula = flop_registry.get(packet)
    if formula is None:
        return 0
    try:
        return int(formula(*args, out_val=node.meta.get("val"), **kwargs))
    except Exception:  # an estimate for the report: a formula that cannot read this node's arguments counts 0
        return 0
