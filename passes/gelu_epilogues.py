"""A linear layer's gelu inside its matmul: one cuBLASLt kernel instead of a matmul and a pass over its output.

Inductor runs a linear layer's matmul on cuBLAS, the bias in its epilogue, and the gelu after it
as a Triton kernel that reads the layer's output and writes it again. In a DiT's feed-forward that
output is four times the model's width: on FLUX (1024 px, bf16, one H200) the gelu kernels take
about 0.07 ms of a double block's 0.98 ms feed-forward. ``aten._addmm_activation(bias, x, w,
use_gelu=True)`` computes the gelu in cuBLASLt's epilogue instead (``bench/matmul_epilogue.py``:
1.15 -> 1.07 ms for 4608 tokens, 0.98 -> 0.92 for 4096).

The op's gelu is not the same everywhere: on CUDA it is the tanh approximation, on the CPU its
kernel runs ``addmm`` and then the exact gelu. The pass rewrites ``gelu(addmm(bias, x, w))``, also
through a view of the matmul's output (a linear layer on 3-D activations), where the device's op
computes the gelu the model asked for: :data:`GELU_IN_EPILOGUE`, CUDA's tanh, the only device with
an epilogue. The tests run the rewrite on the CPU with that device's entry, the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from para_fx.core.capture import call_like
from para_fx.inspect.dump import source_line

aten = torch.ops.aten

GELU_IN_EPILOGUE = {"cuda": "tanh"}  # device type -> the gelu that aten._addmm_activation computes there


def fuse_gelu_epilogues(gm: fx.GraphModule, devices: dict[str, str] | None = None) -> list[str]:
    """Rewrite ``gm`` in place: each linear layer followed only by the gelu that ``devices`` (default
    :data:`GELU_IN_EPILOGUE`) says its device's ``_addmm_activation`` computes becomes that op; the
    source line of each, in graph order."""
    devices = GELU_IN_EPILOGUE if devices is None else devices
    fused = []
    for gelu in list(gm.graph.find_nodes(op="call_function", target=aten.gelu.default)):
        matmul, view = _matmul_under(gelu)
        if matmul is None or devices.get(matmul.meta["val"].device.type) != _approximation(gelu):
            continue
        bias, activation, weight = matmul.args
        with gm.graph.inserting_before(gelu):
            fused_node = call_like(gm.graph, aten._addmm_activation.default, (bias, activation, weight), matmul,
                                   {"use_gelu": True})
            result = fused_node
            if view is not None:
                result = call_like(gm.graph, view.target, (fused_node, *view.args[1:]), view, dict(view.kwargs))
        gelu.replace_all_uses_with(result)
        for node in (gelu, view, matmul):
            if node is not None:
                gm.graph.erase_node(node)
        fused.append(source_line(fused_node))
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _approximation(gelu: fx.Node) -> str:
    return gelu.kwargs.get("approximate", "none")  # keyword-only in the schema


def _matmul_under(gelu: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """The ``addmm`` (and the view between them) whose output only this gelu reads, with its bias a
    vector over the output's columns and no scaling; else ``(None, None)``."""
    source, view = gelu.args[0], None
    if source.op == "call_function" and source.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        source, view = source.args[0], source
        if len(view.users) != 1:
            return None, None
    if source.op != "call_function" or source.target is not aten.addmm.default or len(source.users) != 1:
        return None, None
    if len(source.args) != 3 or source.kwargs or not all(isinstance(a, fx.Node) for a in source.args):
        return None, None  # beta and alpha left at 1
    bias, _, weight = (a.meta["val"] for a in source.args)
    out = source.meta["val"]
    if bias.dim() != 1 or bias.shape[0] != weight.shape[1] or bias.dtype != out.dtype:
        return None, None
    return source, view
