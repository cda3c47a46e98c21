"""A linear layer as the capture leaves it: ``addmm(bias, x, W.t())`` or ``mm(x, W.t())``."""

from __future__ import annotations

import torch
import torch.fx as fx

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
