"""Size arguments, from global to this rank's: the ops whose arguments name sizes or offsets.

A decision (:mod:`para_fx.passes.shard_rules`) says where a tensor is split; an op that names a
size (``view(x, [1, 4608, 3072])``) or an offset (``x[:, 512:]``) along a split dim must name this
rank's size or offset instead. Each entry of :data:`LOCALIZE` rewrites one op's call from its
decision; every other op keeps its arguments, as DTensor's sharding propagation localises size
arguments from one table of ops.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from para_fx.core.placement import Layout, Partial, Shard

from para_fx.runtime.halo import halo_convolution

from .shard_rules import RESHAPES, Call, Decision, Group, conv_window, reduced_dims, shape, slice_bounds

aten = torch.ops.aten

# (call, decision, group) -> (target, kwargs) of the op as it runs on this rank
Localizer = Callable[[Call, Decision, Group], tuple[Any, dict]]


def localize(node: fx.Node, decision: Decision, g: Group) -> tuple[Any, tuple, dict]:
    """``(target, args, kwargs)`` of ``node`` on this rank under ``decision``."""
    fn = LOCALIZE.get(node.target)
    if fn is None or decision.reason is not None:
        return node.target, node.args, node.kwargs
    target, kwargs = fn(Call(node), decision, g)
    return target, (), kwargs


def _local_shape(global_shape: tuple[int, ...], p: Shard, g: Group) -> list[int]:
    local = list(global_shape)
    local[p.dim] = g.local(p.layout)
    return local


def _sized(call: Call, d: Decision, g: Group) -> tuple[Any, dict]:
    """view / reshape / expand: the output's local shape."""
    if not isinstance(d.out, Shard):
        return call.node.target, call.args
    return call.node.target, {**call.args, "size": _local_shape(shape(call.node), d.out, g)}


def local_offset(layout: Layout, start: int, g: Group) -> int:
    """Local index of global position ``start`` when ``start`` is a segment boundary."""
    pos, local = 0, 0
    for count, unit in layout:
        if pos >= start:
            break
        local += g.local(((count, unit),))
        pos += count * unit
    return local


def _bounds(span: Callable[[Call, Decision], Shard]) -> Localizer:
    """slice / slice_scatter along the split dim: local start, and end = start + the local length
    of ``span`` (the slice taken, or the piece scattered)."""

    def fn(call: Call, d: Decision, g: Group) -> tuple[Any, dict]:
        p = d.inputs[call["self"]]
        dim = call.dim("dim", len(shape(call["self"])))
        if not isinstance(p, Shard) or dim != p.dim:
            return call.node.target, call.args
        start, _, _ = slice_bounds(call, shape(call["self"])[dim])
        lo = local_offset(p.layout, start, g)
        return call.node.target, {**call.args, "start": lo, "end": lo + g.local(span(call, d).layout)}

    return fn


def _split(call: Call, d: Decision, g: Group) -> tuple[Any, dict]:
    p = d.inputs[call["self"]]
    dim = call.dim("dim", len(shape(call["self"])))
    if not isinstance(p, Shard) or dim != p.dim:
        return call.node.target, call.args
    sizes = [g.local(out.layout) for out in d.out]
    return aten.split_with_sizes.default, {"self": call["self"], "split_sizes": sizes, "dim": dim}


def _group_norm(call: Call, d: Decision, g: Group) -> tuple[Any, dict]:
    p = d.inputs[call["input"]]
    return call.node.target, {**call.args, "N": g.local(p.layout)} if isinstance(p, Shard) else call.args


def partial_mean(x: torch.Tensor, dims: list[int], keepdim: bool, count: int, dtype=None) -> torch.Tensor:
    """This rank's share of a mean over a sharded dim: its local sum over the global count."""
    return torch.sum(x, dims, keepdim, dtype=dtype) / count


def _mean(call: Call, d: Decision, g: Group) -> tuple[Any, dict]:
    if not isinstance(d.out, Partial):
        return call.node.target, call.args
    dims = reduced_dims(call)
    count = 1
    for dim in dims:
        count *= shape(call["self"])[dim]
    return partial_mean, dict(x=call["self"], dims=dims, keepdim=call.get("keepdim", False), count=count,
                              dtype=call.get("dtype"))


def _convolution(call: Call, d: Decision, g: Group) -> tuple[Any, dict]:
    """Over split rows with padding: the convolution of this rank's rows and its neighbours' borders."""
    p = d.inputs[call["input"]]
    padding = conv_window(call, p.dim)[2] if isinstance(p, Shard) and p.dim >= 2 else 0
    if not padding:
        return call.node.target, call.args
    where = dict(dim=p.dim, halo=padding, parts=g.parts, rank=g.rank, group=g.name)
    return halo_convolution, {**call.args, **where}


LOCALIZE: dict[Any, Localizer] = {
    **{op: _sized for op in RESHAPES},
    aten.expand.default: _sized,
    aten.slice.Tensor: _bounds(lambda call, d: d.out),
    aten.slice_scatter.default: _bounds(lambda call, d: d.inputs[call["src"]]),
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.native_group_norm.default: _group_norm,
    aten.mean.dim: _mean,
    aten.convolution.default: _convolution,
}
