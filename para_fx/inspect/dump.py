"""Graphs as text: one annotated line per node, diffs between passes, and ``PARA_FX_DUMP_DIR``.

Each node renders as ``name = op(args)  # dtype[shape]  placement  module``: Python like
``GraphModule.code``, plus what a reader of a sharded graph asks first (local shapes, the shard
pass's placement, the module that made it). Diffs between passes drop node names, since every
pass renames the nodes; what remains shows the inserted slices and collectives and the
shapes that shrank.

``PARA_FX_DUMP_DIR=dir`` writes, for every graph the backend compiles, one file per pass,
``graph<N>.<i>.<pass>.py``, and the diff to the pass before, ``graph<N>.<i>.<pass>.diff``
(in ``dir/rank<r>/`` when torch.distributed runs more than one rank).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import pathlib
import re

import torch
import torch.distributed as dist
import torch.fx as fx

DUMP_DIR_ENV = "PARA_FX_DUMP_DIR"

_GRAPH_NUMBERS = itertools.count()

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.bool: "b8", torch.uint8: "u8",
}


@dataclasses.dataclass(frozen=True)
class NodeRow:
    """One node of a graph, as the reports show it."""

    name: str
    op: str  # "aten.mm", "_c10d_functional.all_to_all_single", "getitem", "placeholder"
    args: str
    value: str  # "f32[1, 9, 64]"
    placement: str  # the shard pass's placement of the value ("R", "S(1)", "P(sum)"), "" if none
    module: str
    collective: bool

    def line(self) -> str:
        """``name = op(args)  # value  placement  module``."""
        notes = "  ".join(x for x in (self.value, self.placement, self.module) if x)
        return f"{self.name} = {self.op}({self.args})" + (f"  # {notes}" if notes else "")

    def anonymous(self) -> str:
        """The line without names or placement, for diffs across passes: a pass renames every
        node, and the placement only restates what a changed shape shows."""
        return "  ".join(x for x in (self.op, self.value, self.module) if x)


def node_rows(gm: fx.GraphModule) -> list[NodeRow]:
    rows = []
    for node in gm.graph.nodes:
        if node.op == "output":
            rows.append(NodeRow("return", "output", _arg(node.args[0]), "", "", "", False))
            continue
        op = node.op if node.op in ("placeholder", "get_attr") else op_name(node.target)
        args = str(node.target) if node.op == "get_attr" else _args(node.args, node.kwargs)
        placement = (node.meta.get("custom") or {}).get("para_placement", "")
        rows.append(NodeRow(node.name, op, args, value_text(node.meta.get("val")), placement, module_path(node), is_collective(node)))
    return rows


def render(rows: list[NodeRow], module_prefix: str | None = None) -> str:
    """The annotated code; only nodes made inside ``module_prefix`` (a module path) if given."""
    if module_prefix is not None:
        rows = [r for r in rows if r.module == module_prefix or r.module.startswith(module_prefix + ".")]
    return "\n".join(r.line() for r in rows)


def diff(before: list[NodeRow], after: list[NodeRow], before_name: str = "before", after_name: str = "after") -> str:
    """A unified diff of two graphs' nodes, names dropped."""
    return "".join(
        line if line.endswith("\n") else line + "\n"
        for line in difflib.unified_diff(
            [r.anonymous() for r in before], [r.anonymous() for r in after], before_name, after_name, lineterm=""
        )
    )


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


_TORCH_ROOT = os.path.dirname(torch.__file__) + os.sep  # frames below it are torch's own code


def source_line(node: fx.Node) -> str:
    """``file:line  code`` of the innermost frame outside torch that produced a node: the model's
    call of ``flex_attention`` or ``pad_sequence``, not torch's own code below it."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    if not frames:
        return "<unknown source>"
    outside = [frame for frame in frames if not frame[0].startswith(_TORCH_ROOT)]
    path, line, code = (outside or frames)[-1]
    return f"{path}:{line}  {code.strip()}"


def op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        packet = f"{target.namespace}.{target._opname}"
        return packet if target._overloadname == "default" else f"{packet}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    return getattr(target, "__name__", str(target))


def is_collective(node: fx.Node) -> bool:
    """A functional collective that moves data (its wait excluded)."""
    target = node.target
    return getattr(target, "namespace", None) == "_c10d_functional" and "wait" not in target.__name__


def value_text(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{_DTYPES.get(v.dtype, str(v.dtype).removeprefix('torch.'))}{list(v.shape)}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(value_text(x) for x in v) + ")"
    return "" if v is None else type(v).__name__


def _args(args: tuple, kwargs: dict) -> str:
    return ", ".join([*(_arg(a) for a in args), *(f"{k}={_arg(v)}" for k, v in kwargs.items())])


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_arg(x) for x in a)
        return f"({inner},)" if isinstance(a, tuple) and len(a) == 1 else f"({inner})" if isinstance(a, tuple) else f"[{inner}]"
    return repr(a)


def next_graph_name() -> str:
    """``graph0``, ``graph1``, ... in the order the backend compiles them in this process."""
    return f"graph{next(_GRAPH_NUMBERS)}"


def dump_dir() -> pathlib.Path | None:
    """Where to dump graphs (``$PARA_FX_DUMP_DIR``, per rank when distributed), or None."""
    root = os.environ.get(DUMP_DIR_ENV)
    if not root:
        return None
    path = pathlib.Path(root)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        path = path / f"rank{dist.get_rank()}"
    return path


def write_pass(folder: pathlib.Path, graph: str, index: int, name: str, rows: list[NodeRow], previous: tuple[str, list[NodeRow]] | None) -> None:
    """``graph.index.name.py`` and, after the first pass, ``graph.index.name.diff``."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{graph}.{index}.{name}"
    (folder / f"{stem}.py").write_text(f"# {graph}, after the pass {name!r}\n" + render(rows) + "\n")
    if previous is not None:
        before_name, before = previous
        (folder / f"{stem}.diff").write_text(diff(before, rows, f"{graph} {before_name}", f"{graph} {name}"))
