"""One Dynamo trace for several para backends: a test that compiles one model with several backend
options (or meshes) hands each of them the graph Dynamo traced once (``trace_once``, which
``explain_meshes`` uses for meshes: tests/test_inspect.py checks that its reports are those of
separate compiles). Dynamo's bytecode tracing and guards are about half of a para compile of the
tiny models (FLUX's: 1.5 of 3 s of CPU, eager), and its graph does not depend on the backend's options.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from para_fx.inspect.explain import recorded_compile, trace_once

Backend = Callable[[torch.fx.GraphModule, list], Callable[..., Any]]


def each_backend(model: torch.nn.Module, kwargs: dict[str, Any], backends: list[Backend]) -> list[tuple[Any, list]]:
    """For each of ``backends``, in order: the report it recorded while compiling the graph that
    Dynamo traced from ``model(**kwargs)`` once, and that compiled graph's outputs on Dynamo's
    example inputs (the model's tensors and parameters). ``model`` must compile to one graph."""
    results = []

    def every_backend(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        assert not results, "each_backend: the model compiled to more than one graph"
        results.extend(recorded_compile(backend, gm, example_inputs) for backend in backends)

    torch._dynamo.reset()
    try:
        trace_once(model, (), kwargs, every_backend)
    finally:
        torch._dynamo.reset()
    return results
