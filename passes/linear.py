"""A linear layer as the capture leaves it: ``addmm(bias, x, W.t())`` or ``mm(x, W.t())``, and
its fp8 form, ``_scaled_mm``."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .shard_rules import Call

aten = torch.ops.aten
_TRANSPOSES = (aten.t.default, aten.permute.default)


def linear_operands(node: fx.Node) -> tuple[fx.Node | None, fx.Node, fx.Node] | None:
    """``(bias or None, activation, weight)`` of a linear layer's matmul whose transposed weight
    nothing else reads, else None."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is aten.addmm.default and len(node.args) == 3:
        bias, activation, transposed = node.args
        if not isinstance(bias, fx.Node):
            return None
    elif node.target is aten.mm.default:
        bias, (activation, transposed) = None, node.args
    else:
        return None
    if not (isinstance(transposed, fx.Node) and transposed.target in _TRANSPOSES and len(transposed.users) == 1):
        return None
    if transposed.target is aten.permute.default and list(transposed.args[1]) != [1, 0]:
        return None
    return bias, activation, transposed.args[0]


@dataclasses.dataclass(frozen=True)
class ScaledLinear:
    """An fp8 linear layer as the capture leaves it (torchao's dynamic fp8 and the like):
    ``_scaled_mm(x_q, W_q.t(), x_scale, scale_b, bias, None, out_dtype, use_fast_accum)`` with
    ``scale_b`` the weight's scales, ``s.t()`` of an ``[out, 1]`` tensor or an ``[1, out]`` one."""

    activation: fx.Node
    activation_scale: fx.Node
    weight: fx.Node
    weight_scale: fx.Node
    scale_transposed: bool
    bias: fx.Node | None
    out_dtype: torch.dtype | None
    use_fast_accum: bool


def scaled_linear_operands(node: fx.Node) -> ScaledLinear | None:
    """The operands of an fp8 linear layer's ``_scaled_mm`` whose transposed weight (and transposed
    scales) nothing else reads, else None."""
    if node.op != "call_function" or node.target is not aten._scaled_mm.default:
        return None
    a = Call(node).args
    if a.get("scale_result") is not None or not all(isinstance(a[k], fx.Node) for k in ("self", "scale_a", "scale_b")):
        return None
    transposed = a["mat2"]
    if not (isinstance(transposed, fx.Node) and transposed.target is aten.t.default and len(transposed.users) == 1):
        return None
    scale = a["scale_b"]
    scale_transposed = scale.target is aten.t.default and len(scale.users) == 1
    bias = a.get("bias")
    if bias is not None and not isinstance(bias, fx.Node):
        return None
    return ScaledLinear(
        activation=a["self"], activation_scale=a["scale_a"], weight=transposed.args[0],
        weight_scale=scale.args[0] if scale_transposed else scale, scale_transposed=scale_transposed, bias=bias,
        out_dtype=a.get("out_dtype"), use_fast_accum=bool(a.get("use_fast_accum", False)),
    )

