"""Placement rules per aten op family, over one mesh group.

A rule sees the op's node (global shapes in ``meta["val"]``) and the current placement of each
tensor input, and returns a :class:`Decision`: the placement each input must have, the output
placement(s), and the op's arguments rewritten to local sizes where they name sizes. An op
without a rule, or with a sharded dim a rule cannot handle, gets a fallback: every input
replicated (gathered), the result replicated, and a reason for the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from para_fx.passes.dtensor_rules import dtensor_placements
from para_fx.placement import (
    REPLICATE,
    Layout,
    Partial,
    Placement,
    Replicate,
    Shard,
    factor_layout,
    global_size,
    local_size,
    normalize,
    plain,
    repeat,
    scale_units,
)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


@dataclasses.dataclass
class Decision:
    inputs: dict[fx.Node, Placement]
    out: Placement | list[Placement]
    args: tuple | None = None
    kwargs: dict | None = None
    target: Callable | None = None
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


def num_outputs(node: fx.Node) -> int | None:
    v = val(node)
    return len(v) if isinstance(v, (tuple, list)) else None


def replicated(node: fx.Node, reason: str | None = None) -> Decision:
    n = num_outputs(node)
    out = REPLICATE if n is None else [REPLICATE] * n
    return Decision({a: REPLICATE for a in tensor_inputs(node)}, out, reason=reason)


def keep(node: fx.Node, pl: dict, x: fx.Node, out: Placement, args=None, kwargs=None, target=None) -> Decision:
    """``x`` keeps its placement; every other tensor input is replicated."""
    inputs = {a: REPLICATE for a in tensor_inputs(node)}
    inputs[x] = pl[x]
    return Decision(inputs, out, args=args, kwargs=kwargs, target=target)


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


RULES: dict[Any, Callable[[fx.Node, dict, Group], Decision]] = {}


def rule(*targets):
    def register(fn):
        for t in targets:
            RULES[t] = fn
        return fn

    return register


# --- pointwise ---------------------------------------------------------------------------------

EXTRA_POINTWISE = {
    aten._to_copy.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.lift_fresh_copy.default,
    aten.copy.default, aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
    aten.full_like.default,
}


def is_pointwise(target: Any) -> bool:
    return target in EXTRA_POINTWISE or (
        isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
    )


def pointwise(node: fx.Node, pl: dict, g: Group) -> Decision:
    inputs = tensor_inputs(node)
    out_shape = shape(node)
    sharded = [(a, pl[a]) for a in inputs if isinstance(pl[a], Shard)]
    if not sharded:
        return replicated(node)
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
            return replicated(node, f"operand of shape {shape(a)} does not line up with the sharded dim")
    return Decision(required, Shard(out_dim, p.layout))


# --- views -------------------------------------------------------------------------------------


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


def reshape_placement(p: Shard, src: tuple[int, ...], dst: tuple[int, ...]) -> Shard | None:
    """Where a sharded dim goes through a view, and its layout there; None if it splits unevenly."""
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
            layout = factor_layout(flat, _prod(dst[d] for d in gj[:k]), _prod(dst[d] for d in gj[k + 1 :]))
            if layout is not None and global_size(layout) == dst[t]:
                return Shard(t, normalize(layout))
    return None


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _local_shape(global_shape: tuple[int, ...], p: Shard, g: Group) -> list[int]:
    local = list(global_shape)
    local[p.dim] = g.local(p.layout)
    return local


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def view(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    out = reshape_placement(p, shape(x), shape(node))
    if out is None:
        return replicated(node, f"view {shape(x)} -> {shape(node)} splits the sharded dim {p.dim} unevenly")
    return keep(node, pl, x, out, args=(x, _local_shape(shape(node), out, g)))


@rule(aten.expand.default)
def expand(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    out = Shard(p.dim + len(shape(node)) - len(shape(x)), p.layout)
    return keep(node, pl, x, out, args=(x, _local_shape(shape(node), out, g)))


@rule(aten.unsqueeze.default)
def unsqueeze(node, pl, g):
    x, dim = node.args[0], _norm(node.args[1], len(shape(node)))
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    return keep(node, pl, x, Shard(p.dim + (dim <= p.dim), p.layout))


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def squeeze(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    dims = node.args[1] if len(node.args) > 1 else range(len(shape(x)))
    dims = [dims] if isinstance(dims, int) else dims
    removed = [_norm(d, len(shape(x))) for d in dims if shape(x)[d] == 1]
    return keep(node, pl, x, Shard(p.dim - sum(d < p.dim for d in removed), p.layout))


@rule(aten.permute.default)
def permute(node, pl, g):
    x, perm = node.args
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    perm = [_norm(d, len(perm)) for d in perm]
    return keep(node, pl, x, Shard(perm.index(p.dim), p.layout))


@rule(aten.transpose.int)
def transpose(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    a, b = (_norm(d, len(shape(x))) for d in node.args[1:3])
    dim = b if p.dim == a else a if p.dim == b else p.dim
    return keep(node, pl, x, Shard(dim, p.layout))


@rule(aten.t.default)
def t(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    return keep(node, pl, x, Shard(1 - p.dim if len(shape(x)) == 2 else 0, p.layout))


# --- slicing and joining along dims ------------------------------------------------------------


def _segment_span(layout: Layout, start: int, end: int) -> Layout | None:
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


def _local_offset(layout: Layout, start: int, g: Group) -> int:
    """Local index of global position ``start`` when ``start`` is a segment boundary."""
    pos, local = 0, 0
    for count, unit in layout:
        if pos >= start:
            break
        local += g.local(((count, unit),))
        pos += count * unit
    return local


@rule(aten.slice.Tensor)
def slice_(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(shape(x)))
    if dim != p.dim:
        return keep(node, pl, x, p)
    size = shape(x)[dim]
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    step = node.args[4] if len(node.args) > 4 else 1
    start, end = max(0, start + size if start < 0 else start), min(size, end + size if end < 0 else end)
    span = _segment_span(p.layout, start, end) if step == 1 else None
    if span is None:
        return replicated(node, f"slice [{start}:{end}:{step}] of the sharded dim cuts a shard")
    lo = _local_offset(p.layout, start, g)
    return keep(node, pl, x, Shard(dim, span), args=(x, dim, lo, lo + g.local(span)))


def _split_pieces(node, sizes, dim, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    if dim != p.dim:
        return keep(node, pl, x, [p] * len(sizes))
    outs, local_sizes, pos = [], [], 0
    for size in sizes:
        span = _segment_span(p.layout, pos, pos + size)
        if span is None:
            return replicated(node, f"split {list(sizes)} of the sharded dim cuts a shard")
        outs.append(Shard(dim, span))
        local_sizes.append(g.local(span))
        pos += size
    return keep(node, pl, x, outs, args=(x, local_sizes, dim), target=aten.split_with_sizes.default)


@rule(aten.split.Tensor)
def split(node, pl, g):
    x = node.args[0]
    dim = _norm(node.args[2] if len(node.args) > 2 else 0, len(shape(x)))
    return _split_pieces(node, [tuple(v.shape)[dim] for v in val(node)], dim, pl, g)


@rule(aten.split_with_sizes.default)
def split_with_sizes(node, pl, g):
    x = node.args[0]
    dim = _norm(node.args[2] if len(node.args) > 2 else 0, len(shape(x)))
    return _split_pieces(node, list(node.args[1]), dim, pl, g)


@rule(aten.unbind.int, aten.select.int)
def unbind_or_select(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(shape(x)))
    if dim == p.dim:
        return replicated(node, "indexes into the sharded dim")
    out = Shard(p.dim - (dim < p.dim), p.layout)
    return keep(node, pl, x, out if node.target is aten.select.int else [out] * shape(x)[dim])


@rule(aten.cat.default)
def cat(node, pl, g):
    tensors = [t for t in node.args[0]]
    ndim = len(shape(node))
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, ndim)
    sharded = [pl[t] for t in tensors if isinstance(pl[t], Shard)]
    if not sharded:
        return replicated(node)
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


@rule(aten.stack.default)
def stack(node, pl, g):
    tensors = list(node.args[0])
    sharded = [pl[t] for t in tensors if isinstance(pl[t], Shard)]
    if not sharded:
        return replicated(node)
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(shape(node)))
    p = sharded[0]
    return Decision({t: p for t in tensors}, Shard(p.dim + (dim <= p.dim), p.layout))


@rule(aten.slice_scatter.default)
def slice_scatter(node, pl, g):
    x, src = node.args[:2]
    p = pl[x] if isinstance(pl[x], Shard) else pl[src] if isinstance(pl[src], Shard) else None
    if p is None:
        return replicated(node)
    size = shape(x)[p.dim]
    dim = _norm(node.args[2] if len(node.args) > 2 else 0, len(shape(x)))
    if dim != p.dim:
        return Decision({x: p, src: p}, p) if shape(src)[p.dim] == size else replicated(node, "scatter shapes differ")
    if not isinstance(pl[x], Shard):
        p = Shard(dim, plain(size))
    start = node.args[3] if len(node.args) > 3 and node.args[3] is not None else 0
    end = node.args[4] if len(node.args) > 4 and node.args[4] is not None else size
    step = node.args[5] if len(node.args) > 5 else 1
    start, end = start + size if start < 0 else start, min(size, end + size if end < 0 else end)
    span = _segment_span(p.layout, start, end) if step == 1 else None
    if span is None:
        return replicated(node, f"scatter into [{start}:{end}:{step}] of the sharded dim cuts a shard")
    lo = _local_offset(p.layout, start, g)
    return Decision({x: p, src: Shard(dim, span)}, p, args=(x, src, dim, lo, lo + g.local(span)))


@rule(aten.constant_pad_nd.default)
def constant_pad(node, pl, g):
    x, pad = node.args[0], node.args[1]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    from_last = len(shape(x)) - 1 - p.dim
    if 2 * from_last + 1 < len(pad) and (pad[2 * from_last] or pad[2 * from_last + 1]):
        return replicated(node, "pads the sharded dim")
    return keep(node, pl, x, p)


# --- matmul ------------------------------------------------------------------------------------


@rule(aten.mm.default)
def mm(node, pl, g):
    a, b = node.args
    pa, pb = pl[a], pl[b]
    if isinstance(pa, Shard) and pa.dim == 0 and not isinstance(pb, Shard):
        return Decision({a: pa, b: REPLICATE}, pa)
    if isinstance(pb, Shard) and pb.dim == 1 and not isinstance(pa, Shard):
        return Decision({a: REPLICATE, b: pb}, pb)
    if isinstance(pa, Shard) or isinstance(pb, Shard):
        return replicated(node, "matmul over the sharded dim")
    return replicated(node)


@rule(aten.addmm.default)
def addmm(node, pl, g):
    bias, a, b = node.args[:3]
    pa = pl[a]
    if isinstance(pa, Shard) and pa.dim == 0 and not isinstance(pl[b], Shard):
        bias_p = Shard(0, pa.layout) if len(shape(bias)) == 2 and shape(bias)[0] == shape(a)[0] else REPLICATE
        return Decision({bias: bias_p, a: pa, b: REPLICATE}, pa)
    if any(isinstance(pl[x], Shard) for x in (bias, a, b)):
        return replicated(node, "matmul over the sharded dim")
    return replicated(node)


@rule(aten._scaled_mm.default)
def scaled_mm(node, pl, g):
    """fp8 matmul (torchao): rows of ``a`` split with their per-row scales; a per-tensor scale,
    the weight, its scale and the bias stay whole."""
    a, b, scale_a, scale_b = node.args[:4]
    bias = node.args[4] if len(node.args) > 4 else node.kwargs.get("bias")
    pa = pl[a]
    whole = [x for x in (b, scale_b, bias) if isinstance(x, fx.Node)]
    if isinstance(pa, Shard) and pa.dim == 0 and not any(isinstance(pl[x], Shard) for x in whole):
        if val(scale_a).numel() == 1:
            scale_p = REPLICATE
        elif len(shape(scale_a)) == 2 and shape(scale_a)[0] == shape(a)[0]:
            scale_p = Shard(0, pa.layout)
        else:
            return replicated(node, "fp8 matmul with a scale that is neither per-row nor per-tensor")
        return Decision({a: pa, scale_a: scale_p, **{x: REPLICATE for x in whole}}, pa)
    if any(isinstance(pl[x], Shard) for x in (a, b, scale_a, scale_b, *whole)):
        return replicated(node, "fp8 matmul over the sharded dim")
    return replicated(node)


@rule(aten.bmm.default)
def bmm(node, pl, g):
    a, b = node.args
    pa, pb = pl[a], pl[b]
    if isinstance(pa, Shard) and pa.dim == 0 and pb == Shard(0, pa.layout):
        return Decision({a: pa, b: pb}, pa)
    if isinstance(pa, Shard) and pa.dim == 0 and isinstance(pb, Replicate):
        return Decision({a: pa, b: Shard(0, pa.layout)}, pa)
    if isinstance(pa, Shard) and pa.dim == 1 and not isinstance(pb, Shard):
        return Decision({a: pa, b: REPLICATE}, pa)
    if isinstance(pb, Shard) and pb.dim == 2 and not isinstance(pa, Shard):
        return Decision({a: REPLICATE, b: pb}, pb)
    if isinstance(pa, Shard) or isinstance(pb, Shard):
        return replicated(node, "batched matmul over the sharded dim")
    return replicated(node)


# --- normalisation and reductions --------------------------------------------------------------


@rule(aten.native_layer_norm.default)
def layer_norm(node, pl, g):
    x, normalized = node.args[0], node.args[1]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    if p.dim >= len(shape(x)) - len(normalized):
        return replicated(node, "normalises over the sharded dim")
    return keep(node, pl, x, [p, p, p])


@rule(aten._fused_rms_norm.default)
def rms_norm(node, pl, g):
    """CUDA's capture of ``F.rms_norm`` (CPU decomposes it to pointwise ops): (output, rstd)."""
    x, normalized = node.args[0], node.args[1]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    if p.dim >= len(shape(x)) - len(normalized):
        return replicated(node, "normalises over the sharded dim")
    return keep(node, pl, x, [p, p])


@rule(aten.native_group_norm.default)
def group_norm(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    if p.dim != 0:
        return replicated(node, "group norm over the sharded dim")
    args = list(node.args)
    args[3] = g.local(p.layout)
    return keep(node, pl, x, [p, p, p], args=tuple(args))


@rule(aten._softmax.default, aten._log_softmax.default)
def softmax(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    if _norm(node.args[1], len(shape(x))) == p.dim:
        return replicated(node, "softmax over the sharded dim")
    return keep(node, pl, x, p)


def partial_mean(x: torch.Tensor, dims: list[int], keepdim: bool, count: int, dtype=None) -> torch.Tensor:
    """This rank's share of a mean over a sharded dim: its local sum over the global count."""
    return torch.sum(x, dims, keepdim, dtype=dtype) / count


@rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default)
def reduction(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if not isinstance(p, Shard):
        return replicated(node)
    ndim = len(shape(x))
    dims = node.args[1] if len(node.args) > 1 else []
    dims = [_norm(d, ndim) for d in ([dims] if isinstance(dims, int) else dims)] or list(range(ndim))
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if p.dim not in dims:
        return keep(node, pl, x, Shard(p.dim if keepdim else p.dim - sum(d < p.dim for d in dims), p.layout))
    if node.target is aten.amax.default:
        return keep(node, pl, x, Partial("max"))
    if node.target is aten.amin.default:
        return keep(node, pl, x, Partial("min"))
    if node.target is aten.mean.dim:
        count = _prod(shape(x)[d] for d in dims)
        return keep(node, pl, x, Partial("sum"), args=(x, dims, keepdim, count), kwargs=dict(node.kwargs), target=partial_mean)
    return keep(node, pl, x, Partial("sum"))


# --- everything with a batch or index dim ------------------------------------------------------


@rule(aten.embedding.default)
def embedding(node, pl, g):
    weight, indices = node.args[:2]
    p = pl[indices]
    if isinstance(pl[weight], Shard):
        return replicated(node, "embedding table is sharded")
    if not isinstance(p, Shard):
        return replicated(node)
    return keep(node, pl, indices, p)


@rule(aten.convolution.default)
def convolution(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if isinstance(p, Shard) and p.dim == 0 and not any(isinstance(pl[a], Shard) for a in node.args[1:3] if a is not None):
        return keep(node, pl, x, p)
    if any(isinstance(pl[a], Shard) for a in tensor_inputs(node)):
        return replicated(node, "convolution over a sharded dim")
    return replicated(node)


# --- collectives already in the graph (another group's pass) commute with this group -----------


@rule(c10d.wait_tensor.default, c10d.all_reduce.default)
def elementwise_collective(node, pl, g):
    x = node.args[0]
    return keep(node, pl, x, pl[x])


@rule(c10d.all_gather_into_tensor.default)
def all_gather(node, pl, g):
    x = node.args[0]
    p = pl[x]
    if isinstance(p, Shard) and p.dim == 0:
        return replicated(node, "another group gathers along the sharded dim")
    return keep(node, pl, x, p)


VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.slice.Tensor, aten.select.int,
}


def decide(node: fx.Node, pl: dict, g: Group) -> Decision:
    fn = RULES.get(node.target)
    if fn is None and is_pointwise(node.target):
        fn = pointwise
    if fn is None:
        sharded = any(not isinstance(pl[a], Replicate) for a in tensor_inputs(node))
        if not sharded:
            return replicated(node)
        answer = dtensor_placements(node, pl, g.parts, g.rank)
        if answer is not None:
            return Decision(*answer)
        return replicated(node, f"no sharding rule for {node.target}")
    return fn(node, pl, g)

