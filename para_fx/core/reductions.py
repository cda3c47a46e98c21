"""The reductions along rows that para has Inductor keep in registers, read once.

Inductor keeps a reduction along contiguous rows persistent (the whole row in registers) only up
to :data:`INDUCTOR_ROW_LIMIT` values; a wider row is reduced in a loop and read again by whatever
the kernel does with the result. A DiT's layer norms run over its hidden width (FLUX: 3072), and
with fp8 a row's amax joins them: on one H200 (``bench/fp8_quant_probe.py``) FLUX's modulated
layer norm took 0.041 ms looped and 0.020 persistent in bf16, 0.057 and 0.030 with the fp8
quantisation; a 12288-wide quantised row was slower persistent (0.187 against 0.153 ms), hence
:data:`PERSISTENT_ROW_LIMIT`. ``para_fx/core/inductor_choices.py`` has Inductor do it; this module
finds those reductions in a graph, for explain.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

aten = torch.ops.aten

INDUCTOR_ROW_LIMIT = 1024  # Inductor's own (torch 2.11 and 2.13)
PERSISTENT_ROW_LIMIT = 4096

# op -> where its row is: the trailing shape it normalises over, or the dims it reduces (argument 1)
_ROWS = {
    aten.native_layer_norm.default: "shape",
    aten._fused_rms_norm.default: "shape",
    aten.amax.default: "dims",
    aten.amin.default: "dims",
    aten.sum.dim_IntList: "dims",
    aten.mean.dim: "dims",
    aten.var.correction: "dims",
    aten.var_mean.correction: "dims",
}


def wide_rows(gm: fx.GraphModule) -> list[fx.Node]:
    """The reductions of ``gm`` along its last dimension, over more values than Inductor keeps
    in registers and at most :data:`PERSISTENT_ROW_LIMIT`, in graph order."""
    return [node for node in gm.graph.nodes if INDUCTOR_ROW_LIMIT < _row_width(node) <= PERSISTENT_ROW_LIMIT]


def _row_width(node: fx.Node) -> int:
    kind = _ROWS.get(node.target) if node.op == "call_function" else None
    value = node.args[0].meta.get("val") if kind and isinstance(node.args[0], fx.Node) else None
    if value is None or value.dim() == 0 or len(node.args) < 2:
        return 0
    if kind == "shape":
        return math.prod(node.args[1])
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    if [d % value.dim() for d in dims] != [value.dim() - 1]:
        return 0
    return value.shape[-1]
