"""Placement rules per aten op, and the one registry that says what each op is.

A rule is pure: it sees a :class:`Call` (the op's node with its arguments by schema name,
defaults filled in, global shapes in ``meta["val"]``) and the current placement of each tensor
input, and returns a :class:`Decision`: the placement each input must have, the output
placement(s), and a reason when it falls back. It never names local sizes (that is
:mod:`para_fx.passes.localize`) nor builds graph nodes (that is :mod:`para_fx.passes.shard`).

``@rule(op, ..., family=...)`` is the only place that says what an op is: the shard pass, the
block finder and the report ask :func:`family` rather than keep sets of their own. Matmul-like ops
are einsum strings (``"mk,kn->mn"``), views a dim-map table; an op with no rule asks DTensor's
sharding propagation (:mod:`para_fx.passes.dtensor_rules`) and otherwise falls back: every input
replicated (gathered), the result replicated, a reason for the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from para_fx.core.mesh import chunk_sizes
from para_fx.passes.dtensor_rules import dtensor_placements
from para_fx.core.placement import (
    REPLICATE,
    Layout,
    Partial,
    Placement,
    Replicate,
    Shard,
    factor_layout,
    global_size,
    in_units,
    local_size,
    normalize,
    plain,
    repeat,
    scale_units,
)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one op does under sharding: its inputs' required placements, its output placement(s)
    (a list for ops returning several tensors), and why it falls back, if it does."""

    inputs: Mapping[fx.Node, Placement]
    out: Placement | list[Placement]
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Group:
    """The mesh group a shard pass splits over."""

    parts: int
    rank: int
    name: str

    def local(self, layout: Layout) -> int:
        return local_size(layout, self.parts, self.rank)


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(val(node).shape)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    flat, _ = tree_flatten((node.args, node.kwargs))
    seen = []
    for a in flat:
        if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor) and a not in seen:
            seen.append(a)
    return seen


class Call:
    """An op's node with its arguments by schema name (defaults filled in), so no rule reads
    ``node.args[i]`` by position."""

    def __init__(self, node: fx.Node, parts: int | None = None):
        self.node = node
        self.parts = parts  # how many ranks the group splits over, where a rule's answer depends on it
        self.args: dict[str, Any] = {}
        if isinstance(node.target, torch._ops.OpOverload):  # bound by the aten schema's own names
            for i, arg in enumerate(node.target._schema.arguments):
                if i < len(node.args) and not arg.kwarg_only:
                    self.args[arg.name] = node.args[i]
                elif arg.name in node.kwargs:
                    self.args[arg.name] = node.kwargs[arg.name]
                else:
                    self.args[arg.name] = arg.default_value if arg.has_default_value() else None

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.args.get(name)
        return default if value is None else value

    def dim(self, name: str, ndim: int) -> int:
        """A dim argument made non-negative."""
        d = self.args[name]
        return d + ndim if d < 0 else d

    @property
    def tensors(self) -> list[fx.Node]:
        return tensor_inputs(self.node)


Rule = Callable[[Call, Mapping[fx.Node, Placement]], Decision]
RULES: dict[Any, Rule] = {}
FAMILIES: dict[Any, str] = {}


def rule(*targets: Any, family: str):
    """Register ``fn`` as the rule of ``targets``, and say which family they belong to."""

    def register(fn: Rule) -> Rule:
        for target in targets:
            RULES[target] = fn
            FAMILIES[target] = family
        return fn

    return register


def family(target: Any) -> str | None:
    """What kind of op ``target`` is: "pointwise", "copy" (the same values again: clone, alias,
    detach), "reshape" (views that may merge or split dims), "view", "slice", "scatter", "split",
    "join", "pad", "matmul", "norm", "reduction", "softmax", "index", "conv", "factory" (a new tensor of
    given sizes), "collective" or "attention";
    None for an op para has no rule for."""
    if target in FAMILIES:
        return FAMILIES[target]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return "pointwise"
    return None


def replicated(call: Call, reason: str | None = None) -> Decision:
    v = val(call.node)
    out = [REPLICATE] * len(v) if isinstance(v, (tuple, list)) else REPLICATE
    return Decision({a: REPLICATE for a in call.tensors}, out, reason)


def keep(call: Call, pl: Mapping[fx.Node, Placement], x: fx.Node, out: Placement | list[Placement]) -> Decision:
    """``x`` keeps its placement; every other tensor input is replicated."""
    inputs = {a: REPLICATE for a in call.tensors}
    inputs[x] = pl[x]
    return Decision(inputs, out)


def sharded_input(call: Call, pl: Mapping[fx.Node, Placement], name: str = "self") -> Shard | None:
    p = pl[call[name]]
    return p if isinstance(p, Shard) else None


def decide(node: fx.Node, pl: Mapping[fx.Node, Placement], g: Group) -> Decision:
    """The decision for ``node`` given its inputs' placements ``pl`` over group ``g``."""
    call = Call(node, g.parts)
    if not any(isinstance(pl[a], (Shard, Partial)) for a in call.tensors):
        return replicated(call)
    fn = RULES.get(node.target) or (pointwise if family(node.target) == "pointwise" else None)
    if fn is not None:
        return fn(call, pl)
    answer = dtensor_placements(node, pl, g.parts, g.rank)
    if answer is not None:
        return Decision(*answer)
    return replicated(call, f"no sharding rule for {node.target}")


# --- pointwise ---------------------------------------------------------------------------------


@rule(aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default, family="copy")
@rule(
    aten._to_copy.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
    aten.copy.default, aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
    aten.full_like.default,
    family="pointwise",
)
def pointwise(call: Call, pl) -> Decision:
    """Elementwise with broadcasting: every operand that spans the sharded dim is split alike."""
    inputs = call.tensors
    out_shape = shape(call.node)
    sharded = [(a, pl[a]) for a in inputs if isinstance(pl[a], Shard)]
    if not sharded:
        return replicated(call)
    lead, p = sharded[0]
    out_dim = p.dim + len(out_shape) - len(shape(lead))
    required = {}
    for a in inputs:
        dim = out_dim - (len(out_shape) - len(shape(a)))
        if dim < 0 or shape(a)[dim] == 1:
            required[a] = REPLICATE
        elif shape(a)[dim] == out_shape[out_dim]:
            required[a] = Shard(dim, p.layout)
        else:
            return replicated(call, f"operand of shape {shape(a)} does not line up with the sharded dim")
    return Decision(required, Shard(out_dim, p.layout))


@rule(
    aten.new_empty.default, aten.new_empty_strided.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_full.default,
    family="factory",
)
def new_tensor(call: Call, pl) -> Decision:
    """A tensor of the sizes given: ``self`` lends only its dtype and device, so it stays as it is split."""
    return keep(call, pl, call["self"], REPLICATE)


# --- views: a dim-map table --------------------------------------------------------------------


def view_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of source dims with runs of destination dims of equal product."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        ps = pd = 1
        if i < len(src):
            gi.append(i)
            ps = src[i]
            i += 1
        if j < len(dst):
            gj.append(j)
            pd = dst[j]
            j += 1
        while ps != pd:
            if ps < pd and i < len(src):
                gi.append(i)
                ps *= src[i]
                i += 1
            elif pd < ps and j < len(dst):
                gj.append(j)
                pd *= dst[j]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def reshape_placement(p: Shard, src: tuple[int, ...], dst: tuple[int, ...], parts: int | None = None) -> Shard | None:
    """Where a sharded dim goes through a reshape, and its layout there; None if it splits unevenly.
    Given the group's ``parts``, a split of tokens that falls on whole rows for that many ranks also
    goes into rows: 1024 tokens split in 2 are 16 rows of 32 on each rank."""
    if 0 in src:
        return None
    for gi, gj in view_groups(src, dst) or []:
        if p.dim not in gi:
            continue
        pos = gi.index(p.dim)
        outer = _prod(src[d] for d in gi[:pos])
        inner = _prod(src[d] for d in gi[pos + 1 :])
        flat = repeat(scale_units(p.layout, inner), outer)
        for k, t in enumerate(gj):
            if dst[t] == 1:
                continue
            outer, inner = _prod(dst[d] for d in gj[:k]), _prod(dst[d] for d in gj[k + 1 :])
            layout = factor_layout(flat, outer, inner)
            if layout is None and parts is not None:
                rows = in_units(flat, inner, parts)
                layout = None if rows is None else factor_layout(rows, outer, inner)
            if layout is not None and global_size(layout) == dst[t]:
                return Shard(t, normalize(layout))
    return None


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _reshape(call: Call, p: Shard) -> Shard | None:
    return reshape_placement(p, shape(call["self"]), shape(call.node), call.parts)


def _squeeze(call: Call, p: Shard) -> Shard:
    x_shape = shape(call["self"])
    dims = call.get("dim", list(range(len(x_shape))))
    dims = [dims] if isinstance(dims, int) else dims
    removed = [d + len(x_shape) if d < 0 else d for d in dims if x_shape[d] == 1]
    return Shard(p.dim - sum(d < p.dim for d in removed), p.layout)


def _transpose(call: Call, p: Shard) -> Shard:
    ndim = len(shape(call["self"]))
    a, b = call.dim("dim0", ndim), call.dim("dim1", ndim)
    return Shard(b if p.dim == a else a if p.dim == b else p.dim, p.layout)


# op -> (call, the input's Shard) -> the output's Shard, or None where the view splits the dim unevenly
DIM_MAPS: dict[Any, Callable[[Call, Shard], Shard | None]] = {
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.expand.default: lambda call, p: Shard(p.dim + len(shape(call.node)) - len(shape(call["self"])), p.layout),
    aten.unsqueeze.default: lambda call, p: Shard(p.dim + (call.dim("dim", len(shape(call.node))) <= p.dim), p.layout),
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.permute.default: lambda call, p: Shard(
        [d + len(call["dims"]) if d < 0 else d for d in call["dims"]].index(p.dim), p.layout
    ),
    aten.transpose.int: _transpose,
    aten.t.default: lambda call, p: Shard(1 - p.dim if len(shape(call["self"])) == 2 else 0, p.layout),
    # complex RoPE: [..., 2] real pairs <-> [...] complex numbers; the leading dims stay where they are
    aten.view_as_complex.default: lambda call, p: p if p.dim < len(shape(call["self"])) - 1 else None,
    aten.view_as_real.default: lambda call, p: p,
}


RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


@rule(*RESHAPES, family="reshape")
@rule(*(op for op in DIM_MAPS if op not in RESHAPES), family="view")
def view(call: Call, pl) -> Decision:
    p = sharded_input(call, pl)
    if p is None:
        return replicated(call)
    out = DIM_MAPS[call.node.target](call, p)
    if out is None:
        return replicated(
            call, f"view {shape(call['self'])} -> {shape(call.node)} splits the sharded dim {p.dim} unevenly"
        )
    return keep(call, pl, call["self"], out)


# --- slicing and joining along dims: segments --------------------------------------------------


def segment_span(layout: Layout, start: int, end: int) -> Layout | None:
    """The segments exactly covering global ``[start, end)``, or None if it cuts a segment."""
    pos, taken = 0, []
    for count, unit in layout:
        size = count * unit
        if start <= pos and pos + size <= end:
            taken.append((count, unit))
        elif pos < end and start < pos + size:
            return None
        pos += size
    return tuple(taken) if global_size(tuple(taken)) == end - start else None


def slice_bounds(call: Call, size: int) -> tuple[int, int, int]:
    """A slice's ``(start, end, step)`` clamped to ``[0, size]``."""
    start, end, step = call.get("start", 0), call.get("end", size), call.get("step", 1)
    start = max(0, start + size if start < 0 else start)
    return start, min(size, end + size if end < 0 else end), step


@rule(aten.slice.Tensor, family="slice")
def slice_(call: Call, pl) -> Decision:
    p = sharded_input(call, pl)
    if p is None:
        return replicated(call)
    dim = call.dim("dim", len(shape(call["self"])))
    if dim != p.dim:
        return keep(call, pl, call["self"], p)
    start, end, step = slice_bounds(call, shape(call["self"])[dim])
    span = segment_span(p.layout, start, end) if step == 1 else None
    if span is None:
        return replicated(call, f"slice [{start}:{end}:{step}] of the sharded dim cuts a shard")
    return keep(call, pl, call["self"], Shard(dim, span))


def _split_pieces(call: Call, pl, sizes: list[int]) -> Decision:
    p = sharded_input(call, pl)
    if p is None:
        return replicated(call)
    dim = call.dim("dim", len(shape(call["self"])))
    if dim != p.dim:
        return keep(call, pl, call["self"], [p] * len(sizes))
    outs, pos = [], 0
    for size in sizes:
        span = segment_span(p.layout, pos, pos + size)
        if span is None:
            return replicated(call, f"split {list(sizes)} of the sharded dim cuts a shard")
        outs.append(Shard(dim, span))
        pos += size
    return keep(call, pl, call["self"], outs)


@rule(aten.split.Tensor, family="split")
def split(call: Call, pl) -> Decision:
    dim = call.dim("dim", len(shape(call["self"])))
    return _split_pieces(call, pl, [tuple(v.shape)[dim] for v in val(call.node)])


@rule(aten.split_with_sizes.default, family="split")
def split_with_sizes(call: Call, pl) -> Decision:
    return _split_pieces(call, pl, list(call["split_sizes"]))


@rule(aten.unbind.int, family="split")
@rule(aten.select.int, family="view")
def unbind_or_select(call: Call, pl) -> Decision:
    p = sharded_input(call, pl)
    if p is None:
        return replicated(call)
    x_shape = shape(call["self"])
    dim = call.dim("dim", len(x_shape))
    if dim == p.dim:
        return replicated(call, "indexes into the sharded dim")
    out = Shard(p.dim - (dim < p.dim), p.layout)
    return keep(call, pl, call["self"], out if call.node.target is aten.select.int else [out] * x_shape[dim])


@rule(aten.cat.default, family="join")
def cat(call: Call, pl) -> Decision:
    tensors = list(call["tensors"])
    ndim = len(shape(call.node))
    dim = call.dim("dim", ndim)
    sharded = [pl[t] for t in tensors if isinstance(pl[t], Shard)]
    if not sharded:
        return replicated(call)
    live = [t for t in tensors if len(shape(t)) == ndim]  # cat skips legacy empty [0] tensors
    if any(p.dim == dim for p in sharded):
        required, layout = {}, ()
        for t in live:
            p = pl[t]
            if not (isinstance(p, Shard) and p.dim == dim):
                p = Shard(dim, plain(shape(t)[dim]))
            required[t] = p
            layout += p.layout
        return Decision(required, Shard(dim, normalize(layout)))
    p = sharded[0]
    return Decision({t: p for t in live}, p)


@rule(aten.stack.default, family="join")
def stack(call: Call, pl) -> Decision:
    tensors = list(call["tensors"])
    sharded = [pl[t] for t in tensors if isinstance(pl[t], Shard)]
    if not sharded:
        return replicated(call)
    dim = call.dim("dim", len(shape(call.node)))
    p = sharded[0]
    return Decision({t: p for t in tensors}, Shard(p.dim + (dim <= p.dim), p.layout))


@rule(aten.slice_scatter.default, family="scatter")
def slice_scatter(call: Call, pl) -> Decision:
    x, src = call["self"], call["src"]
    p = pl[x] if isinstance(pl[x], Shard) else pl[src] if isinstance(pl[src], Shard) else None
    if p is None:
        return replicated(call)
    size = shape(x)[p.dim]
    dim = call.dim("dim", len(shape(x)))
    if dim != p.dim:
        return Decision({x: p, src: p}, p) if shape(src)[p.dim] == size else replicated(call, "scatter shapes differ")
    start, end, step = slice_bounds(call, size)
    if not isinstance(pl[x], Shard):
        # a whole destination is cut to the source's layout (free): the source keeps its shards
        p = Shard(dim, normalize(((start, 1),) + p.layout + ((size - end, 1),)) if step == 1 else plain(size))
    span = segment_span(p.layout, start, end) if step == 1 else None
    if span is None:
        return replicated(call, f"scatter into [{start}:{end}:{step}] of the sharded dim cuts a shard")
    return Decision({x: p, src: Shard(dim, span)}, p)


@rule(aten.select_scatter.default, family="scatter")
def select_scatter(call: Call, pl) -> Decision:
    """``src`` written at one index of a dim that is not split: each rank writes its shard."""
    x, src = call["self"], call["src"]
    dim = call.dim("dim", len(shape(x)))
    if isinstance(pl[x], Shard):
        p = pl[x]
    elif isinstance(pl[src], Shard):
        p = Shard(pl[src].dim + (dim <= pl[src].dim), pl[src].layout)
    else:
        return replicated(call)
    if p.dim == dim:
        return replicated(call, "scatter into an index of the sharded dim")
    return Decision({x: p, src: Shard(p.dim - (dim < p.dim), p.layout)}, p)


@rule(aten.constant_pad_nd.default, family="pad")
def constant_pad(call: Call, pl) -> Decision:
    p = sharded_input(call, pl)
    if p is None:
        return replicated(call)
    pad = call["pad"]
    from_last = len(shape(call["self"])) - 1 - p.dim
    if 2 * from_last + 1 < len(pad) and (pad[2 * from_last] or pad[2 * from_last + 1]):
        return replicated(call, "pads the sharded dim")
    return keep(call, pl, call["self"], p)


# --- matmuls: einsum strings -------------------------------------------------------------------


def einsum_decision(equation: str, operands: list[fx.Node], pl) -> tuple[dict, Placement] | str:
    """Placements of a matmul written as an einsum over ``operands``: a sharded letter splits every
    operand that has it; the output is split on it, or a partial sum where it is contracted.
    A reason string when the operands are split on different letters or layouts."""
    spec, out = equation.split("->")
    specs = spec.split(",")
    letters = {(specs[i][pl[x].dim], pl[x].layout) for i, x in enumerate(operands) if isinstance(pl[x], Shard)}
    if len(letters) != 1:
        return "operands split on different dims"
    ((letter, layout),) = letters
    required = {
        x: Shard(specs[i].index(letter), layout) if letter in specs[i] else REPLICATE for i, x in enumerate(operands)
    }
    return required, Shard(out.index(letter), layout) if letter in out else Partial("sum")


def _matmul(equation: str, names: tuple[str, ...]) -> Rule:
    def fn(call: Call, pl) -> Decision:
        answer = einsum_decision(equation, [call[n] for n in names], pl)
        if isinstance(answer, str):
            return replicated(call, f"matmul: {answer}")
        return Decision(*answer)

    return fn


rule(aten.mm.default, family="matmul")(_matmul("mk,kn->mn", ("self", "mat2")))
rule(aten.bmm.default, family="matmul")(_matmul("bmk,bkn->bmn", ("self", "mat2")))


@rule(aten.addmm.default, family="matmul")
def addmm(call: Call, pl) -> Decision:
    """``bias + mat1 @ mat2``: the bias follows the output's split, like a pointwise addend."""
    bias, a, b = call["self"], call["mat1"], call["mat2"]
    if isinstance(pl[bias], Shard):
        return replicated(call, "the bias of a matmul is split")
    answer = einsum_decision("mk,kn->mn", [a, b], pl)
    if isinstance(answer, str):
        return replicated(call, f"matmul: {answer}")
    required, out = answer
    if isinstance(out, Partial):
        return replicated(call, "a bias added to a sum split over the ranks")
    bias_dim = out.dim - (2 - len(shape(bias)))
    spans = bias_dim >= 0 and shape(bias)[bias_dim] == shape(call.node)[out.dim]
    return Decision({bias: Shard(bias_dim, out.layout) if spans else REPLICATE, **required}, out)


@rule(aten._scaled_mm.default, family="matmul")
def scaled_mm(call: Call, pl) -> Decision:
    """fp8 matmul (torchao): rows of ``self`` split with their per-row scales; a per-tensor scale,
    the weight, its scale and the bias stay whole."""
    a, scale_a = call["self"], call["scale_a"]
    whole = [x for x in (call["mat2"], call["scale_b"], call.get("bias")) if isinstance(x, fx.Node)]
    pa = pl[a]
    if not (isinstance(pa, Shard) and pa.dim == 0) or any(isinstance(pl[x], Shard) for x in whole):
        return replicated(call, "fp8 matmul over the sharded dim")
    if val(scale_a).numel() == 1:
        scale_p = REPLICATE
    elif len(shape(scale_a)) == 2 and shape(scale_a)[0] == shape(a)[0]:
        scale_p = Shard(0, pa.layout)
    else:
        return replicated(call, "fp8 matmul with a scale that is neither per-row nor per-tensor")
    return Decision({a: pa, scale_a: scale_p, **{x: REPLICATE for x in whole}}, pa)


# --- normalisation and reductions --------------------------------------------------------------


def _normalised_over_last(call: Call, pl, outputs: int) -> Decision:
    p = sharded_input(call, pl, "input")
    if p is None:
        return replicated(call)
    if p.dim >= len(shape(call["input"])) - len(call["normalized_shape"]):
        return replicated(call, "normalises over the sharded dim")
    return keep(call, pl, call["input"], [p] * outputs)


@rule(aten.native_layer_norm.default, family="norm")
def layer_norm(call: Call, pl) -> Decision:
    return _normalised_over_last(call, pl, 3)  # (output, mean, rstd)


@rule(aten._fused_rms_norm.default, family="norm")
def rms_norm(call: Call, pl) -> Decision:
    """CUDA's capture of ``F.rms_norm`` (CPU decomposes it to pointwise ops): (output, rstd)."""
    return _normalised_over_last(call, pl, 2)


@rule(aten.native_group_norm.default, family="norm")
def group_norm(call: Call, pl) -> Decision:
    p = sharded_input(call, pl, "input")
    if p is None:
        return replicated(call)
    if p.dim != 0:
        return replicated(call, "group norm over the sharded dim")
    return keep(call, pl, call["input"], [p, p, p])


@rule(aten._log_softmax.default, family="reduction")
@rule(aten._softmax.default, aten._safe_softmax.default, family="softmax")  # an attention computed as matmuls has one
def softmax(call: Call, pl) -> Decision:
    p = sharded_input(call, pl)
    if p is None:
        return replicated(call)
    if call.dim("dim", len(shape(call["self"]))) == p.dim:
        return replicated(call, "softmax over the sharded dim")
    return keep(call, pl, call["self"], p)


def reduced_dims(call: Call) -> list[int]:
    ndim = len(shape(call["self"]))
    dims = call.get("dim", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d + ndim if d < 0 else d for d in dims] or list(range(ndim))


_PARTIAL = {aten.amax.default: "max", aten.amin.default: "min"}


@rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, family="reduction")
def reduction(call: Call, pl) -> Decision:
    p = sharded_input(call, pl)
    if p is None:
        return replicated(call)
    dims = reduced_dims(call)
    if p.dim not in dims:
        keepdim = call.get("keepdim", False)
        return keep(call, pl, call["self"], Shard(p.dim if keepdim else p.dim - sum(d < p.dim for d in dims), p.layout))
    # a mean becomes a local sum over the global count (localize), so all three are partial sums or extrema
    return keep(call, pl, call["self"], Partial(_PARTIAL.get(call.node.target, "sum")))


# --- everything with a batch or index dim ------------------------------------------------------


@rule(aten.embedding.default, family="index")
def embedding(call: Call, pl) -> Decision:
    if isinstance(pl[call["weight"]], Shard):
        return replicated(call, "embedding table is sharded")
    p = sharded_input(call, pl, "indices")
    if p is None:
        return replicated(call)
    return keep(call, pl, call["indices"], p)


@rule(aten.convolution.default, family="conv")
def convolution(call: Call, pl) -> Decision:
    """Split over the batch, or over a spatial dim that the window slides along with stride 1 and
    keeps its length: each rank then needs only ``padding`` rows of each neighbour (a halo, which
    :mod:`para_fx.passes.localize` has exchanged before the convolution)."""
    p = sharded_input(call, pl, "input")
    params = [x for x in (call["weight"], call.get("bias")) if isinstance(x, fx.Node)]
    if any(not isinstance(pl[x], Replicate) for x in params):
        return replicated(call, "convolution with split or partial weights")
    if p is None:
        return replicated(call, "convolution of a partial input")
    reason = None if p.dim == 0 else halo_refusal(call, p)
    return keep(call, pl, call["input"], p) if reason is None else replicated(call, reason)


def conv_window(call: Call, dim: int) -> tuple[int, int, int, int]:
    """(kernel size, stride, padding, dilation) of a convolution along input dim ``dim`` (>= 2)."""
    i = dim - 2
    at = lambda values: values[i] if len(values) > i else values[0]  # noqa: E731
    return shape(call["weight"])[dim], at(call["stride"]), at(call["padding"]), at(call["dilation"])


def halo_refusal(call: Call, p: Shard) -> str | None:
    """Why a convolution cannot run on rows split along spatial dim ``p.dim``, or None if it can."""
    kernel, stride, padding, dilation = conv_window(call, p.dim)
    if call["transposed"] or stride != 1 or dilation != 1 or kernel != 2 * padding + 1:
        return "convolution over a sharded dim that is strided, dilated, transposed or changes its length"
    if len(p.layout) != 1 or p.layout[0][1] != 1:
        return "convolution over a sharded dim that is not split in whole rows"
    if call.parts is None or min(chunk_sizes(p.layout[0][0], call.parts)) < max(padding, 1):
        return f"convolution over a sharded dim where a rank holds fewer than its {padding} halo rows"
    return None


# --- collectives already in the graph (another group's pass) commute with this group -----------


@rule(c10d.wait_tensor.default, family="collective")
def wait(call: Call, pl) -> Decision:
    return keep(call, pl, call["tensor"], pl[call["tensor"]])


@rule(c10d.all_reduce.default, family="collective")
def all_reduce(call: Call, pl) -> Decision:
    return keep(call, pl, call["input"], pl[call["input"]])


@rule(c10d.all_gather_into_tensor.default, family="collective")
def all_gather(call: Call, pl) -> Decision:
    p = pl[call["input"]]
    if isinstance(p, Shard) and p.dim == 0:
        return replicated(call, "another group gathers along the sharded dim")
    return keep(call, pl, call["input"], p)


# --- attention: placements decided by the shard pass itself (per group kind) -------------------

ATTENTION = (
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
)
for _op in ATTENTION:
    FAMILIES[_op] = "attention"

# Flex attention, captured as a higher-order op: its block mask's tensors (``[B, H, ...]``), its
# score_mod and mask_mod (graphs of ``(score,) b, h, q_idx, kv_idx, *buffers``) and their buffers
FLEX_ATTENTION = torch.ops.higher_order.flex_attention
FLEX_ARGS = (
    "query", "key", "value", "score_mod", "block_mask", "scale", "kernel_options", "score_mod_other_buffers",
    "mask_mod_other_buffers",
)
FAMILIES[FLEX_ATTENTION] = "attention"
# where each mod takes the batch and head index: score_mod(score, b, h, q_idx, kv_idx), mask_mod(b, h, q_idx, kv_idx)
FLEX_INDEX = {"score_mod": {"b": 1, "h": 2}, "mask_mod": {"b": 0, "h": 1}}


def flex_args(node: fx.Node) -> dict[str, Any]:
    """A flex attention's arguments by name, its mask_mod (the block mask's last item) as ``mask_mod``."""
    args = dict(zip(FLEX_ARGS, node.args))
    args.update(node.kwargs)
    args.setdefault("score_mod_other_buffers", ())
    args.setdefault("mask_mod_other_buffers", ())
    args["mask_mod"] = args["block_mask"][-1]
    return args


def flex_block_mask_tensors(args: Mapping[str, Any]) -> list[fx.Node]:
    """The block mask's tensors, each ``[B|1, H|1, ...]``."""
    return [x for x in args["block_mask"] if isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor)]


def flex_reads(mod: Any, which: str, index: str) -> bool | None:
    """Whether score_mod or mask_mod (``which``, a graph) reads its batch or head ``index`` ("b", "h");
    None when it is not a graph para can read."""
    if not isinstance(mod, fx.GraphModule):
        return None
    placeholders = list(mod.graph.find_nodes(op="placeholder"))
    position = FLEX_INDEX[which][index]
    return position < len(placeholders) and bool(placeholders[position].users)
