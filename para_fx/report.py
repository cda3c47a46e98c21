"""What the passes did to a graph, as plain records: attention sites, fallbacks, collectives."""

from __future__ import annotations

import dataclasses
import re

import torch.fx as fx


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
    bytes: int
    module: str = ""


@dataclasses.dataclass
class Report:
    attention_sites: list[AttentionSite] = dataclasses.field(default_factory=list)
    fallbacks: list[Fallback] = dataclasses.field(default_factory=list)
    collectives: list[Collective] = dataclasses.field(default_factory=list)
    graphs: dict[str, str] = dataclasses.field(default_factory=dict)  # pass name -> readable code
    notes: list[str] = dataclasses.field(default_factory=list)
    graph_count: int = 0  # graphs Dynamo handed to the backend: more than one means graph breaks

    def add_graph(self, name: str, graph: fx.GraphModule) -> None:
        """Record the graph after the pass ``name`` as readable code."""
        self.graphs[name] = graph.code

    def extend(self, other: "Report") -> None:
        for field in ("attention_sites", "fallbacks", "collectives", "notes"):
            getattr(self, field).extend(getattr(other, field))
        prefix = f"graph{self.graph_count}_" if self.graph_count else ""
        self.graphs.update({prefix + k: v for k, v in other.graphs.items()})
        self.graph_count += other.graph_count

    def __str__(self) -> str:
        lines = [f"attention sites ({len(self.attention_sites)}):"]
        lines += _table(
            ["module", "strategy", "query len (local/global)", "placements"],
            [[s.module, s.strategy, f"{s.local_query_len}/{s.global_query_len}", s.placements] for s in self.attention_sites],
        )
        lines.append(f"fallbacks ({len(self.fallbacks)}):")
        lines += _table(["op", "reason", "source"], [[f.op, f.reason, f.source] for f in self.fallbacks])
        total = sum(c.bytes for c in self.collectives)
        lines.append(f"collectives ({len(self.collectives)}, {total / 2**20:.2f} MiB per call):")
        lines += _table(["kind", "bytes", "module"], [[c.kind, str(c.bytes), c.module] for c in self.collectives])
        if self.graph_count > 1:
            lines.append(
                f"note: Dynamo split the model into {self.graph_count} graphs; code between graphs "
                "(attention included) runs unsharded on full tensors"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return [fmt(header)] + [fmt(r) for r in rows]


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module a node came from (``transformer_blocks.0.attn``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?|^L__self___?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"(?:\.?__dict__\['_modules'\]|\._modules)\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def source_line(node: fx.Node) -> str:
    """``file:line  code`` of the innermost user frame that produced a node."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    if not frames:
        return "<unknown source>"
    path, line, code = frames[-1]
    return f"{path}:{line}  {code.strip()}"


def collectives_of(graph: fx.GraphModule) -> list[Collective]:
    """Every collective a graph issues per call (waits excluded), with the bytes it returns."""
    found = []
    for node in graph.graph.nodes:
        target = node.target
        if getattr(target, "namespace", None) != "_c10d_functional" or "wait" in target.__name__:
            continue
        v = node.meta.get("val")
        size = v.numel() * v.element_size() if v is not None else 0
        found.append(Collective(target.__name__.split(".")[0], size, module_path(node)))
    return found
