"""``para_fx.explain``: run a model once through the para backend and report what the passes did."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .backend import backend, recording
from .mesh import init_mesh
from .report import Report


def explain(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    mesh: DeviceMesh | None = None,
    cache: Any = None,
) -> Report:
    """Compile ``model`` with the para backend (graphs run as Python), call it once, return the report.

    With a process group and no ``mesh``, the default mesh (all Ulysses) is used; every rank must
    call ``explain`` together, and each reports what it does itself.
    """
    if mesh is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        mesh = init_mesh()
    compiled = torch.compile(model, backend=backend(mesh=mesh, cache=cache, compiler="eager"))
    with torch.no_grad(), recording() as report:
        compiled(*args, **(kwargs or {}))
    return report
