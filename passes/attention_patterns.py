"""Attention written as matmuls and a softmax, rewritten as one ``scaled_dot_product_attention``.

The shard pass splits the tokens starting from attention ops. A model that writes its attention by
hand (``softmax(q @ k.transpose(-2, -1) * scale + bias) @ v``, as many reference DiTs do), or SDPA's
math path (which CUDA takes where no fused kernel fits, e.g. a head dimension that is not a
multiple of 8), reaches the capture as ``bmm``, ``softmax``, ``bmm``: with no attention op, nothing
would be split. This pass finds that chain and replaces it with the attention op it computes, so
the shard pass makes it a Ulysses or Ring site like any other; the runtime then also picks a fused
kernel for it.

Matched, from the second matmul backwards (each intermediate used only by the next, so nothing
else reads the probabilities):

    bmm(view(probabilities), view(v))   probabilities = [cast] softmax(logits, dim=-1) [cast]
    logits = [cast] [masked_fill(hidden, -inf)] [+ bias] [* or / a number] view(bmm(view(q), view(k^T)))

(or ``baddbmm(bias, q, k^T, alpha=scale)``, as ``nn.MultiheadAttention`` with a mask writes it),

where each ``view`` is a chain of ``view``/``_unsafe_view``/``clone``/``expand`` between a
``[B, H, L, D]`` tensor and the ``[B*H, L, D]`` one the matmul takes. Where no such tensor is
found (``nn.MultiheadAttention`` reshapes straight to ``[B*H, L, D]``), or the bias only fits the
flattened scores, the attention takes the matmul's operands as ``[1, B*H, L, D]``: every (sample,
head) pair a head, which Ulysses splits as it splits heads. A scale applied to ``q`` or ``k``
before the matmul stays in them. A ``masked_fill`` counts as hiding keys where its value is
``-inf`` or at most :data:`HIDDEN_BELOW` (the same softmax, except in a row that hides every key:
there the hand-written form averages the values, or gives NaN, and the attention op gives 0).
Anything else (dropout, a bias added before the scale, a bias in a wider dtype than the scores) is
left as it is, and the graph keeps the existing behaviour: computed whole on every rank, with the
note that says so.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from para_fx.core.capture import call_like
from para_fx.inspect.report import source_line

from .shard_rules import Call, family, val

aten = torch.ops.aten

_CASTS = (aten._to_copy.default, torch.ops.prims.convert_element_type.default)
HIDDEN_BELOW = -1e4  # a masked_fill value at or below this hides the key: exp(-1e4 - score) is 0 in fp32
_MULTIPLY = (aten.mul.Tensor, aten.mul.Scalar)
_DIVIDE = (aten.div.Tensor, aten.div.Scalar)
_FLATTENING = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
               aten.expand.default)


@dataclasses.dataclass(frozen=True)
class Recognized:
    """One rewritten attention: where its softmax was in the model's source."""

    source: str


def recognize_attention(gm: fx.GraphModule) -> list[Recognized]:
    """Rewrite every matched chain in ``gm`` in place; what was rewritten, in graph order."""
    found = []
    for node in list(gm.graph.nodes):
        if node.target is aten.bmm.default:
            match = _match(node)
            if match is not None:
                found.append(Recognized(source_line(match.softmax)))
                _rewrite(gm.graph, node, match)
    if found:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return found


@dataclasses.dataclass(frozen=True)
class _Match:
    query: fx.Node  # [B, H, L, D], or the matmul's own [B*H, L, D] where no such view is found
    key_t: fx.Node  # [B, H, D, S] (or [B*H, D, S])
    value: fx.Node  # [B, H, S, Dv] (or [B*H, S, Dv])
    bias: fx.Node | None  # added to the scores, broadcast to [B, H, L, S]
    hidden: fx.Node | None  # True where a key is hidden from a query, broadcast to [B, H, L, S]
    scale: float
    softmax: fx.Node


def _match(out_bmm: fx.Node) -> _Match | None:
    probabilities, values = out_bmm.args
    chain = _through(probabilities, _FLATTENING + _CASTS)  # the probabilities back to the softmax
    softmax = chain[-1]
    ndim = val(softmax).dim()
    if family(softmax.target) != "softmax" or Call(softmax).dim("dim", ndim) != ndim - 1:
        return None
    logits = _through(softmax.args[0], _CASTS)
    chain += logits
    node, bias, hidden, scale = logits[-1], None, None, 1.0
    if node.target is aten.masked_fill.Scalar and _hides(node):
        node, hidden = node.args[0], node.args[1]
        chain.append(node)
    if node.target is aten.add.Tensor and all(isinstance(x, fx.Node) for x in node.args):
        x, y = node.args  # the scores on either side
        node, bias = (x, y) if _scores(_unscaled(x)) is not None else (y, x)
        chain.append(node)
    if _unscaled(node) is not node:
        factor = node.args[1]
        node, scale = node.args[0], float(factor) if node.target in _MULTIPLY else 1.0 / factor
        chain.append(node)
    views = _scores(node)
    if views is None or not all(len(n.users) == 1 for n in chain + views[:-1]):
        return None  # something else reads the scores or the probabilities
    keys = val(views[-1]).shape[-1]
    if any(val(n).shape[-1] != keys for n in chain + views):
        return None  # a view that regroups the scores: the softmax would not run over each query's keys
    matmul = views[-1]
    if matmul.target is aten.baddbmm.default:  # beta * input + alpha * (q @ k^T)
        beta, alpha = matmul.kwargs.get("beta", 1), matmul.kwargs.get("alpha", 1)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (beta, alpha)):
            return None
        if beta:
            if beta != 1 or bias is not None:
                return None
            bias = matmul.args[0]
        scale *= alpha
    operands = (*matmul.args[-2:], values)
    unflattened = [_unflattened(x) for x in operands]
    for query, key_t, value in ([unflattened] if None not in unflattened else []) + [operands]:
        if _fits(query, key_t, value, bias, hidden, scale):
            return _Match(query, key_t, value, bias, hidden, scale, softmax)
    return None


def _fits(query: fx.Node, key_t: fx.Node, value: fx.Node, bias, hidden, scale: float) -> bool:
    """Whether the attention op computes this: shapes that agree, the bias and the hidden keys
    broadcast to the scores, one dtype, or a bias that widens to it exactly (SDPA takes a float mask
    of the query's dtype; a narrowing cast would round the model's bias)."""
    q, k, v = (_four_dims(val(x).shape) for x in (query, key_t, value))
    if not (q[:2] == k[:2] == v[:2] and q[3] == k[2] and k[3] == v[2]) or not math.isfinite(scale):
        return False
    scores_shape, dtype = (*q[:3], k[3]), val(query).dtype
    return (
        (bias is None or (_broadcasts(val(bias).shape, scores_shape) and _widens_exactly(val(bias).dtype, dtype)))
        and (hidden is None or _broadcasts(val(hidden).shape, scores_shape))
        and val(key_t).dtype == val(value).dtype == dtype
    )


def _widens_exactly(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every value of ``source`` is one of ``target``: the same dtype, or a narrower float
    (SDPA's math path runs half precision in float32 and adds the mask it built in half precision)."""
    return source == target or (source.is_floating_point and torch.promote_types(source, target) == target
                                and torch.finfo(source).bits < torch.finfo(target).bits)


def _hides(masked_fill: fx.Node) -> bool:
    """Whether a ``masked_fill`` of the scores hides keys: a boolean mask filled with a value that no
    softmax weight survives (``-inf``, or so far below any score that its exponential is 0)."""
    mask, fill = masked_fill.args[1:3]
    return (isinstance(mask, fx.Node) and val(mask).dtype == torch.bool and isinstance(fill, (int, float))
            and fill <= HIDDEN_BELOW)


def _unscaled(node: fx.Node) -> fx.Node:
    """What ``node`` multiplies or divides by a nonzero number, or ``node`` itself."""
    if node.target in _MULTIPLY + _DIVIDE:
        x, factor = node.args
        if isinstance(x, fx.Node) and isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor:
            return x
    return node


def _scores(node: fx.Node) -> list[fx.Node] | None:
    """``node`` back through views to the scores' matmul (the chain, the matmul last), or None."""
    chain = _through(node, (aten.view.default, aten._unsafe_view.default))
    return chain if chain[-1].target in (aten.bmm.default, aten.baddbmm.default) else None


def _rewrite(graph: fx.Graph, out_bmm: fx.Node, m: _Match) -> None:
    """The attention op in place of ``out_bmm``: its ``[B, H, L, Dv]`` output replaces the view that
    unflattened the matmul's, or is flattened as the matmul's was."""
    with graph.inserting_before(out_bmm):
        key = _untransposed(m.key_t) or call_like(graph, aten.transpose.int, (m.key_t, -2, -1), m.softmax)
        query, key, value = m.query, key, m.value
        if val(query).dim() == 3:  # no [B, H, ...] view to be found: the B*H matmuls as heads of one sample
            query, key, value = (call_like(graph, aten.unsqueeze.default, (x, 0), m.softmax) for x in (query, key, value))
        bias = m.bias
        if m.hidden is not None:  # one mask: hidden keys -inf in the bias, or False in a boolean mask
            bias = (call_like(graph, aten.logical_not.default, (m.hidden,), m.softmax) if bias is None else
                    call_like(graph, aten.where.ScalarSelf, (m.hidden, -math.inf, bias), m.softmax))
        if bias is not None and val(bias).dtype not in (torch.bool, val(query).dtype):  # widened: exact
            bias = call_like(graph, aten._to_copy.default, (bias,), m.softmax, {"dtype": val(query).dtype})
        while bias is not None and val(bias).dim() < 4:  # the attention op's mask is [B|1, H|1, L, S]
            bias = call_like(graph, aten.unsqueeze.default, (bias, 0), m.softmax)
        kwargs = {"attn_mask": bias, "scale": m.scale}
        attention = call_like(graph, aten.scaled_dot_product_attention.default, (query, key, value), m.softmax, kwargs)
        shape = tuple(val(attention).shape)
        for user in list(out_bmm.users):
            if user.target in (aten.view.default, aten._unsafe_view.default) and tuple(val(user).shape) == shape:
                user.replace_all_uses_with(attention)
        if not out_bmm.users:
            return
        if val(m.query).dim() == 3:
            flat = call_like(graph, aten.squeeze.dim, (attention, 0), m.softmax)
        else:  # read flattened too
            contiguous = {"memory_format": torch.contiguous_format}
            dense = call_like(graph, aten.clone.default, (attention,), m.softmax, contiguous)
            flat = call_like(graph, aten.view.default, (dense, list(val(out_bmm).shape)), m.softmax)
        out_bmm.replace_all_uses_with(flat)



def _untransposed(key_t: fx.Node) -> fx.Node | None:
    """``k`` where ``key_t`` is ``k.transpose(-2, -1)``."""
    n = val(key_t).dim()
    if key_t.target is aten.transpose.int and {d % n for d in key_t.args[1:3]} == {n - 2, n - 1}:
        return key_t.args[0]
    return None


def _four_dims(shape) -> tuple[int, ...]:
    """A ``[B*H, L, D]`` operand read as ``[1, B*H, L, D]``: every (sample, head) pair a head."""
    return tuple(shape) if len(shape) == 4 else (1, *shape)


def _unflattened(node: fx.Node) -> fx.Node | None:
    """The ``[B, H, L, D]`` tensor that ``node`` (``[B*H, L, D]``) flattens, if a chain of views,
    copies and expansions leads to one."""
    want = val(node).shape
    found = None
    for candidate in _through(node, _FLATTENING):  # the furthest back: no copy left in front of the attention
        shape = val(candidate).shape
        if len(shape) == 4 and shape[0] * shape[1] == want[0] and tuple(shape[2:]) == tuple(want[1:]):
            found = candidate
    return found


def _through(node: fx.Node, ops: tuple) -> list[fx.Node]:
    """``node`` and its first arguments back through ``ops``, nearest first."""
    chain = [node]
    while chain[-1].op == "call_function" and chain[-1].target in ops and isinstance(chain[-1].args[0], fx.Node):
        chain.append(chain[-1].args[0])
    return chain


def _broadcasts(shape, to) -> bool:
    return all(a in (1, b) for a, b in zip(reversed(tuple(shape)), reversed(tuple(to))))
