"""Wide fp8 rows quantised by para-fx's kernel: torchao's per-row quantisation of a ``gelu`` or a
``cat(x, gelu)`` becomes one ``para_fx::quantize_rows`` (:mod:`para_fx.runtime.fp8_rows`).

The capture leaves torchao's dynamic per-row fp8 of a linear layer's input ``x`` as

    scale = _to_copy(view(div(amax(abs(view(x)), [-1], keepdim), 448)), float32)
    x_fp8 = _to_copy(clamp(div(_to_copy(x, float32), scale), -448, 448), float8_e4m3fn)

Inductor compiles that to one looped reduction that computes the gelu twice; for rows wider than
:data:`PERSISTENT_ROW_LIMIT` (narrower ones Inductor already keeps in registers, the producer fused)
and at most :data:`MAX_ROW`, when ``x`` is ``gelu(h)`` or ``cat([p, gelu(h)], -1)`` in bf16, the pass
replaces both with ``quantize_rows(p, h)``, whose kernel reads ``p`` and ``h`` once. The op's
result is torchao's bit for bit; on devices outside :data:`DEVICES` (the CPU) the pass leaves the
graph alone, and the tests run it there with the op's aten form.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from para_fx.core.capture import call_like
from para_fx.core.reductions import PERSISTENT_ROW_LIMIT
from para_fx.inspect.dump import source_line
from para_fx.runtime.fp8_rows import FP8_MAX, MAX_ROW

from .shard_rules import family

aten = torch.ops.aten

DEVICES = ("cuda",)  # device types where quantize_rows runs its Triton kernel


@dataclasses.dataclass(frozen=True)
class RowQuantisation:
    """One activation's per-row fp8 quantisation as the capture leaves it."""

    rows: fx.Node  # the bf16 activation ``x``
    scale: fx.Node  # its float32 scales, ``x``'s shape with 1 for the last dim
    quantised: fx.Node  # ``x`` in float8_e4m3fn
    plain: fx.Node | None  # ``p`` of ``cat([p, gelu(h)])``
    gelu_input: fx.Node  # ``h``
    nodes: tuple[fx.Node, ...]  # what the replacement leaves unread, outputs first


def quantize_wide_rows(gm: fx.GraphModule, devices: tuple[str, ...] | None = None) -> list[str]:
    """Rewrite ``gm`` in place: each match of :func:`row_quantisation` on ``devices`` (default
    :data:`DEVICES`) becomes one ``quantize_rows``; the source line of each, in graph order."""
    devices = DEVICES if devices is None else devices
    graph, rewritten = gm.graph, []
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.find_nodes(op="call_function", target=aten._to_copy.default)):
        match = row_quantisation(node)
        if match is None or match.rows.meta["val"].device.type not in devices:
            continue
        with graph.inserting_before(min(match.scale.users, key=order.__getitem__)):  # after both inputs, before any reader
            both = call_like(graph, torch.ops.para_fx.quantize_rows.default, (match.plain, match.gelu_input), match.quantised)
            quantised = call_like(graph, operator.getitem, (both, 0), match.quantised)
            scale = call_like(graph, operator.getitem, (both, 1), match.scale)
        match.quantised.replace_all_uses_with(quantised)
        match.scale.replace_all_uses_with(scale)
        for dead in match.nodes:
            if not dead.users:
                graph.erase_node(dead)
        rewritten.append(source_line(match.quantised))
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def row_quantisation(node: fx.Node) -> RowQuantisation | None:
    """The quantisation that ends in ``node`` (the cast to float8_e4m3fn), when its rows are a
    bf16 ``gelu(h)`` or ``cat([p, gelu(h)], -1)`` of more than ``PERSISTENT_ROW_LIMIT`` and at most
    ``MAX_ROW`` values; else None."""
    clamp = _cast_of(node, torch.float8_e4m3fn)
    if clamp is None or clamp.target is not aten.clamp.default or tuple(clamp.args[1:]) != (-FP8_MAX, FP8_MAX):
        return None
    divide = clamp.args[0]
    if not _is_call(divide, aten.div.Tensor) or not all(isinstance(a, fx.Node) for a in divide.args):
        return None
    upcast, scale = divide.args
    rows = _cast_of(upcast, torch.float32)
    amax_scaled = _cast_of(scale, torch.float32)
    if rows is None or amax_scaled is None:
        return None
    x = rows.meta["val"]
    if x.dtype != torch.bfloat16 or not PERSISTENT_ROW_LIMIT < x.shape[-1] <= MAX_ROW:
        return None
    scaled = _through_reshapes(amax_scaled)
    if not (_is_call(scaled, aten.div.Tensor) and scaled.args[1] == FP8_MAX):
        return None
    amax = scaled.args[0]
    if not (_is_call(amax, aten.amax.default) and _last_dim_kept(amax)):
        return None
    absolute = amax.args[0]
    if not (_is_call(absolute, aten.abs.default) and _through_reshapes(absolute.args[0]) is rows):
        return None
    producer = _gelu_rows(rows)
    if producer is None:
        return None
    chain = [node, clamp, divide, upcast, scale, *_reshapes(amax_scaled), scaled, amax, absolute,
             *_reshapes(absolute.args[0])]
    return RowQuantisation(rows, scale, node, *producer, tuple(chain))


def _gelu_rows(rows: fx.Node) -> tuple[fx.Node | None, fx.Node] | None:
    """``(p, h)`` when ``rows`` is ``cat([p, gelu(h)], -1)`` or ``(None, h)`` for ``gelu(h)``, all bf16."""
    if _is_tanh_gelu(rows):
        return None, rows.args[0]
    if not _is_call(rows, aten.cat.default) or len(rows.args) < 1:
        return None
    parts = rows.args[0]
    dim = rows.args[1] if len(rows.args) > 1 else rows.kwargs.get("dim", 0)
    if len(parts) != 2 or dim not in (-1, rows.meta["val"].dim() - 1):
        return None
    plain, gelu = parts
    if not (_is_tanh_gelu(gelu) and plain.meta["val"].dtype == torch.bfloat16):
        return None
    return plain, gelu.args[0]


def _is_tanh_gelu(node: fx.Node) -> bool:
    return (_is_call(node, aten.gelu.default) and node.kwargs.get("approximate") == "tanh"
            and node.args[0].meta["val"].dtype == torch.bfloat16)


def _cast_of(node: fx.Node, dtype: torch.dtype) -> fx.Node | None:
    """``x`` of ``node = _to_copy(x, dtype=dtype)`` (nothing else changed), else None."""
    if not _is_call(node, aten._to_copy.default) or set(node.kwargs) != {"dtype"} or node.kwargs["dtype"] != dtype:
        return None
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def _last_dim_kept(amax: fx.Node) -> bool:
    dims = amax.args[1] if len(amax.args) > 1 else amax.kwargs.get("dim", [])
    keepdim = amax.args[2] if len(amax.args) > 2 else amax.kwargs.get("keepdim", False)
    ndim = amax.args[0].meta["val"].dim()
    return keepdim and list(dims) in ([-1], [ndim - 1])


def _reshapes(node: fx.Node) -> list[fx.Node]:
    """The chain of reshapes that ``node`` heads (``node`` itself first), down to what is not one."""
    chain = []
    while isinstance(node, fx.Node) and family(node.target) == "reshape" and node.op == "call_function":
        chain.append(node)
        node = node.args[0]
    return chain


def _through_reshapes(node: fx.Node) -> fx.Node:
    """What ``node`` reshapes, through a chain of reshapes; ``node`` when it is none."""
    chain = _reshapes(node)
    return chain[-1].args[0] if chain else node


def _is_call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target
