"""Dynamo's per-call guards on the insides of quantized weights, taken over by the backend.

Dynamo guards every tensor-subclass input with two checks written in Python, run on every call
(its ``__tensor_flatten__`` metadata, and its list of inner tensors), and one tensor guard per
inner tensor, reached through an attribute lookup on the subclass. With torchao's fp8 weights
(FLUX.1: 504 of them, 1008 inner tensors) that is milliseconds of host time per call, which a step
with CUDA graphs waits for. A model's weights are the same objects on every call, so the backend
drops those guards for the subclass *parameters* of a graph and checks the same things itself,
where it is cheap: :class:`~para_fx.core.capture.SubclassFlattener` already notices a weight, inner
tensor or attribute that was replaced, and only then is the weight's layout compared with the
compiled one; and one C++ call per step checks every inner tensor's type, dtype, device, sizes and
strides against the compiled ones (a change in place). Either raises (Dynamo would have
recompiled; a graph built for another layout never runs). Dynamo keeps its guard on each weight
itself (type and shape). Subclass inputs that are not parameters keep all their guards.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# the two guard kinds Dynamo writes in Python for a tensor subclass (the second on
# ``SubclassAttrListSource``: the names its ``__tensor_flatten__`` returns)
_PYTHON_GUARDS = ("TENSOR_SUBCLASS_METADATA_MATCH", "EQUALS_MATCH")


def layout(value: Any) -> Any:
    """What Dynamo's guards on a subclass input describe: its type, inner tensors' names and
    metadata (recursively), and each plain inner tensor's shape, stride, dtype and device."""
    if not is_traceable_wrapper_subclass(value):
        return tuple(value.shape), value.stride(), value.dtype, value.device
    names, context = value.__tensor_flatten__()
    return type(value), tuple(names), copy.deepcopy(context), tuple(layout(getattr(value, n)) for n in names)


def same_layout(expected: Any, value: Any) -> bool:
    if not is_traceable_wrapper_subclass(value):
        return not isinstance(expected[0], type) and layout(value) == expected
    cls, names, context, inner = expected
    flat_names, flat_context = value.__tensor_flatten__()
    if type(value) is not cls or tuple(flat_names) != names:
        return False
    matches = cls.__metadata_guard__(context, flat_context) if hasattr(cls, "__metadata_guard__") else flat_context == context
    return matches and all(same_layout(e, getattr(value, n)) for e, n in zip(inner, names, strict=True))


def take_over_weight_guards(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[int, Any]:
    """Remove Dynamo's Python guards on the subclass parameters among ``gm``'s inputs from the frame
    being compiled; their layouts by input position, for the caller to check on every new object.

    Nothing is removed (and ``{}`` returned) outside a Dynamo compile: a graph compiled at call time
    has no guards of its own."""
    context = torch._guards.TracingContext.try_get()
    if context is None:
        return {}
    owned: dict[Any, int] = {}  # a parameter's source -> its input position
    for position, (node, value) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs)):
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is not None and isinstance(value, torch.nn.Parameter) and is_traceable_wrapper_subclass(value):
            owned[source] = position
    if not owned:
        return {}
    guards = context.guards_context.dynamo_guards
    by_source = getattr(guards, "source_to_guards", None)  # torch 2.13 indexes them; 2.11 does not
    for guard in [guard for guard in guards.inner if _taken_over(guard, owned)]:
        guards.inner.discard(guard)
        if by_source is not None:
            by_source[guard.originating_source].remove(guard)
    return {position: layout(example_inputs[position]) for position in owned.values()}


def _taken_over(guard: Any, owned: dict[Any, int]) -> bool:
    """Whether ``guard`` is one the backend checks itself: a Python guard on an owned parameter or
    a subclass inside it, or the tensor guard of a tensor inside it."""
    kind = guard.create_fn_name()
    source = guard.originating_source
    if kind == "TENSOR_MATCH":
        return source not in owned and _inside(getattr(source, "base", None), owned)
    if kind not in _PYTHON_GUARDS:
        return False
    if kind == "EQUALS_MATCH":
        if type(source).__name__ != "SubclassAttrListSource":
            return False
        source = source.base
    return _inside(source, owned)


def _inside(source: Any, owned: dict[Any, int]) -> bool:
    """Whether ``source`` is an owned parameter or reached through one."""
    while source is not None:
        if source in owned:
            return True
        source = getattr(source, "base", None)
    return False


class LayoutCheck:
    """What the backend checks instead of Dynamo, for ``SubclassFlattener``: a weight flattened anew
    must have its compiled layout, and no inner tensor may change its metadata in place."""

    def __init__(self, layouts: dict[int, Any], names: Sequence[str]):
        self.layouts = layouts
        self.names = names

    def new_weight(self, position: int, value: Any) -> None:
        expected = self.layouts.get(position)
        if expected is not None and not same_layout(expected, value):
            raise RuntimeError(
                f"para_fx: the quantized weight {self.names[position]} changed layout since the graph was compiled "
                f"(replaced, or an attribute reassigned: now a {type(value).__name__} with other metadata, inner "
                f"tensors or shapes). para checks quantized weights itself instead of Dynamo, so it cannot "
                f"recompile for the new layout: call torch._dynamo.reset() and compile again after changing a "
                f"model's quantization."
            )

    def in_place(self, parts: Sequence[torch.Tensor], paths: Sequence[tuple[int, str]]):
        """A check for every call: ``parts`` (the inner tensors, with the layout just checked) keep
        their type, dtype, device, sizes and strides. Dynamo's own check of them, one guard per inner
        tensor, is what :func:`take_over_weight_guards` removed: this is the same C++ check in one call."""
        from torch._C._dynamo.guards import TensorGuards

        guards = TensorGuards(*parts, dynamic_dims_sizes=[list(p.shape) for p in parts],
                              dynamic_dims_strides=[list(p.stride()) for p in parts])

        def check() -> None:
            if not guards.check(*parts):
                names = [f"{self.names[position]}.{path}" for position, path in paths]
                raise RuntimeError(
                    f"para_fx: an inner tensor of a quantized weight changed in place since the graph was compiled "
                    f"({guards.check_verbose(*parts, tensor_check_names=names)}); call torch._dynamo.reset() and "
                    f"compile again after changing a model's quantization."
                )

        return check
