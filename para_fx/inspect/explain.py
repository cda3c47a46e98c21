"""``para_fx.explain``: run a model once through the para backend and report what the passes did.

``explain(model, kwargs=..., world_size=4, ulysses=2, ring=2)`` answers "what would happen on 4
GPUs?" on a laptop: it simulates the mesh in this process with torch's fake process group (rank 0
of 4, collectives that move nothing), so the passes see the same mesh and produce the same report
as rank 0 of a real run. The sharded graph runs once on fake collectives: its outputs are
meaningless, the report is what counts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..core.backend import backend, recording
from ..core.mesh import init_mesh, mesh_info
from .dump import value_text
from .report import Report, RunContext


def explain(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    mesh: DeviceMesh | None = None,
    cache: Any = None,
    *,
    world_size: int | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
    batch: int = 1,
    rank: int = 0,
) -> Report:
    """Compile ``model`` with the para backend (graphs run as Python), call it once, return the report.

    ``world_size`` (with ``ulysses``, ``ring``, ``batch`` as in :func:`para_fx.init_mesh`):
    simulate that mesh in this process, as rank ``rank``; torch.distributed must not be
    initialised. Otherwise, under a process group, every rank calls ``explain`` together with
    ``mesh`` (or the degrees, or neither: all Ulysses), and each reports what it does itself.
    """
    degrees = dict(ulysses=ulysses, ring=ring, batch=batch)
    if world_size is not None:
        if mesh is not None:
            raise ValueError("explain: pass either mesh or world_size (to simulate a mesh), not both")
        with simulated_mesh(world_size, rank=rank, device_type=_device_type(model), **degrees) as simulated:
            return _explain(model, args, kwargs, simulated, cache, simulated=True)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if mesh is None and distributed:
        mesh = init_mesh(**degrees)
    elif mesh is None and any(d not in (None, 1) for d in degrees.values()):
        raise ValueError(
            f"explain({', '.join(f'{k}={v}' for k, v in degrees.items() if v not in (None, 1))}) without a "
            "process group: pass world_size=... to simulate the mesh"
        )
    return _explain(model, args, kwargs, mesh, cache)


def explain_meshes(
    model: torch.nn.Module,
    meshes: list[dict[str, int]],
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    cache: Any = None,
) -> list[Report]:
    """``explain(model, args, kwargs, cache=cache, **degrees)`` for each ``degrees`` of ``meshes``
    (``world_size`` and optionally ``ulysses``, ``ring``, ``batch``, ``rank``: simulated meshes),
    with Dynamo tracing the model once: each graph it hands over goes through the para backend once
    per mesh, on that mesh. The reports are the ones the separate calls give (Dynamo's graphs do
    not depend on the mesh; tests/test_inspect.py compares them); Dynamo's bytecode tracing and
    guards, about half of an explain's time on the tiny models, are paid once."""
    if dist.is_initialized():
        raise RuntimeError("explain_meshes simulates meshes and needs torch.distributed uninitialised")
    kwargs = kwargs or {}
    reports = [Report() for _ in meshes]

    def every_mesh(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> None:
        for degrees, total in zip(meshes, reports):
            degrees = dict(degrees)
            with simulated_mesh(degrees.pop("world_size"), device_type=_device_type(model), **degrees) as mesh:
                report, _ = recorded_compile(backend(mesh=mesh, cache=cache, compiler="eager"), gm, example_inputs)
                total.extend(report)
                _describe(total, model, args, kwargs, mesh, simulated=True)

    trace_once(model, args, kwargs, every_mesh)
    for report in reports:
        _check_compiled(report, "explain_meshes")
    return reports


def trace_once(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
               compile_graph: Callable[[torch.fx.GraphModule, list[Any]], None]) -> None:
    """Dynamo traces ``model(*args, **kwargs)`` once and hands each graph to ``compile_graph``, which
    may compile it as often as it likes (per mesh, per backend option); the graph then runs as traced."""

    def handing_over(gm: torch.fx.GraphModule, example_inputs: list[Any]):
        compile_graph(gm, example_inputs)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=handing_over)(*args, **kwargs)


def recorded_compile(compiler: Callable, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> tuple[Report, list]:
    """What a para backend recorded while compiling ``gm`` and running it once on ``example_inputs``
    (a graph specialised at call time compiles at that call), and that run's outputs."""
    with recording() as report, torch.no_grad():
        outputs = list(compiler(gm, example_inputs)(*example_inputs))
    return report, outputs


def _explain(model, args, kwargs, mesh, cache, simulated: bool = False) -> Report:
    compiled = torch.compile(model, backend=backend(mesh=mesh, cache=cache, compiler="eager"))
    with torch.no_grad(), recording() as report:
        compiled(*args, **(kwargs or {}))
    _check_compiled(report, "explain")
    _describe(report, model, args, kwargs or {}, mesh, simulated)
    return report


def _check_compiled(report: Report, caller: str) -> None:
    if report.graph_count == 0:
        raise RuntimeError(
            f"{caller}: Dynamo compiled no graph for this model (its recompile limit may be reached after "
            "many compilations of the same code: call torch._dynamo.reset() first)"
        )


def _describe(report: Report, model, args: tuple, kwargs: dict[str, Any], mesh: DeviceMesh | None,
              simulated: bool) -> None:
    """The report's world size and what was explained (while a simulated mesh is still alive)."""
    report.world_size = mesh_info(mesh).world if mesh is not None else 1
    report.context = _context(model, args, kwargs, mesh, simulated)


def _context(model, args: tuple, kwargs: dict[str, Any], mesh: DeviceMesh | None, simulated: bool) -> RunContext:
    from .. import __version__  # the package imports this module first

    info = mesh_info(mesh) if mesh is not None else None
    named = [*((f"args[{i}]", a) for i, a in enumerate(args)), *kwargs.items()]
    return RunContext(
        model=type(model).__name__,
        world_size=info.world if info else 1,
        batch=info.batch if info else 1,
        ring=info.ring if info else 1,
        ulysses=info.ulysses if info else 1,
        rank=dist.get_rank() if info else 0,
        simulated=simulated,
        inputs=[f"{name} {value_text(value)}" for name, value in named if isinstance(value, torch.Tensor)],
        versions=f"torch {torch.__version__}, para-fx {__version__}",
    )


@contextlib.contextmanager
def simulated_mesh(
    world_size: int,
    ulysses: int | None = None,
    ring: int | None = None,
    batch: int = 1,
    rank: int = 0,
    device_type: str = "cpu",
) -> Iterator[DeviceMesh]:
    """A para-fx mesh of ``world_size`` ranks in this process, seen from ``rank``, on torch's fake
    process group (collectives return at once and move nothing); torn down on exit."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"simulated_mesh: world_size must be a positive int, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"simulated_mesh: rank {rank} is not in [0, {world_size})")
    if dist.is_initialized():
        raise RuntimeError(
            "explain(world_size=...) simulates a mesh and needs torch.distributed uninitialised; "
            "under a process group, pass mesh=para_fx.init_mesh(...) instead"
        )
    # Importing this module registers the "fake" backend with torch.distributed.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield init_mesh(ulysses=ulysses, ring=ring, batch=batch, device_type=device_type)
    finally:
        dist.destroy_process_group()


def _device_type(model: torch.nn.Module) -> str:
    param = next(iter(model.parameters()), None)
    return param.device.type if param is not None else "cpu"
