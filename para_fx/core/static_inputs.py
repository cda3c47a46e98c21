"""Which graph inputs keep their address between calls, told to Inductor the way Dynamo tells it.

Inductor's CUDA graphs copy every input into a buffer of their own on each call, except the inputs
known to be static (parameters, buffers). Inductor reads that from marks Dynamo leaves on its graph
module; the graphs that para's passes re-trace do not carry them, so without ``mark_static_inputs``
every weight of the model would be copied on every step."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch.fx as fx
from torch._dynamo.source import ConstantSource

from .capture import flatten_subclasses

_STATIC = "_dynamo_static_input_type"


def static_flags(dynamo_graph: fx.GraphModule, example_inputs: Sequence[Any]) -> list[bool]:
    """Whether each input of the Dynamo graph is static, one flag per tensor after subclass
    flattening (an fp8 weight's inner tensors are as static as the weight)."""
    placeholders = dynamo_graph.graph.find_nodes(op="placeholder")
    return [
        bool(node.meta.get("tensor_dict", {}).get(_STATIC))
        for node, value in zip(placeholders, example_inputs, strict=True)
        for _ in flatten_subclasses([value])
    ]


def mark_static_inputs(graph: fx.GraphModule, dynamo_graph: fx.GraphModule, static: Sequence[bool]) -> None:
    """Marks ``graph``'s first inputs static where ``static`` says so; inputs past its end (state
    the passes added) are not. A graph that Dynamo did not capture is left alone."""
    compile_id = dynamo_graph.meta.get("dynamo_compile_id")
    if compile_id is None:
        return
    placeholders = graph.graph.find_nodes(op="placeholder")
    if len(static) > len(placeholders):
        raise ValueError(f"para_fx: {len(static)} input flags for a graph of {len(placeholders)} inputs")
    graph.meta["dynamo_compile_id"] = compile_id
    # parameters are graph inputs (Dynamo inlines modules); what the graph holds as attributes are
    # constants the trace lifted (``_tensor_constant0``): AOTAutograd makes them static inputs
    graph._param_name_to_source = {
        name: ConstantSource(f"para_fx_{name}")
        for name, _ in itertools.chain(
            graph.named_parameters(remove_duplicate=False), graph.named_buffers(remove_duplicate=False)
        )
    }
    for node, is_static in zip(placeholders, [*static, *[False] * (len(placeholders) - len(static))]):
        node._dynamo_source = None
        node.meta["tensor_dict"] = {_STATIC: "unguarded"} if is_static else {}
