"""The device mesh para-fx runs on, and the plain data the passes read from it.

A mesh has three named dims, ("batch", "ring", "ulysses"). The sequence is split over the
flattened (ring, ulysses) dims: this rank's sequence index is ``ring_rank * ulysses + ulysses_rank``.
The batch dim splits dim 0 (classifier-free guidance batches). Everything downstream works on
:class:`MeshInfo`, which holds only ints and group names, so traced code sees constants.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("batch", "ring", "ulysses")


def init_mesh(
    ulysses: int | None = None,
    ring: int | None = None,
    batch: int = 1,
    device_type: str | None = None,
) -> DeviceMesh | None:
    """A ("batch", "ring", "ulysses") mesh over the whole world; defaults to all Ulysses.

    Returns None when torch.distributed is not initialised and every degree is 1: that is the
    single-device case, which ``para_fx.backend(mesh=None)`` also accepts.
    """
    _check_positive(ulysses=ulysses, ring=ring, batch=batch)
    if not (dist.is_available() and dist.is_initialized()):
        asked = {n: d for n, d in (("ulysses", ulysses), ("ring", ring), ("batch", batch)) if d and d > 1}
        if asked:
            raise RuntimeError(
                f"init_mesh({', '.join(f'{n}={d}' for n, d in asked.items())}): torch.distributed is "
                "not initialised. Launch with torchrun and call "
                "torch.distributed.init_process_group() first."
            )
        return None
    batch, ring, ulysses = mesh_degrees(dist.get_world_size(), ulysses, ring, batch)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() != "gloo" else "cpu"
    return init_device_mesh(device_type, (batch, ring, ulysses), mesh_dim_names=MESH_DIMS)


def mesh_degrees(world: int, ulysses: int | None = None, ring: int | None = None, batch: int = 1) -> tuple[int, int, int]:
    """``(batch, ring, ulysses)`` that :func:`init_mesh` gives ``world`` ranks; ``ValueError`` when
    the degrees do not fit. Pure arithmetic: callers can check degrees before any process starts."""
    _check_positive(world_size=world, ulysses=ulysses, ring=ring, batch=batch)
    if world % batch:
        raise ValueError(f"init_mesh: batch={batch} does not divide the world size {world}")
    seq = world // batch
    if ulysses is None and ring is None:
        ulysses, ring = seq, 1
    elif ulysses is None or ring is None:
        name, given = ("ring", ring) if ulysses is None else ("ulysses", ulysses)
        if seq % given:
            raise ValueError(
                f"init_mesh: {name}={given} does not divide the world size {world} / batch {batch} = {seq}"
            )
        ulysses, ring = (seq // ring, ring) if ulysses is None else (ulysses, seq // ulysses)
    if batch * ring * ulysses != world:
        raise ValueError(
            f"init_mesh: batch={batch} x ring={ring} x ulysses={ulysses} must multiply to the "
            f"world size {world}"
        )
    return batch, ring, ulysses


def _check_positive(**degrees: int | None) -> None:
    for name, degree in degrees.items():
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
            raise ValueError(f"init_mesh: {name} must be a positive int, got {degree!r}")


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    """Sizes, this rank's coordinates and the process-group names of a para-fx mesh."""

    batch: int
    ring: int
    ulysses: int
    batch_rank: int
    ring_rank: int
    ulysses_rank: int
    batch_group: str
    ring_group: str
    ulysses_group: str
    seq_group: str  # the flattened (ring, ulysses) group

    @property
    def seq(self) -> int:
        return self.ring * self.ulysses

    @property
    def seq_rank(self) -> int:
        return self.ring_rank * self.ulysses + self.ulysses_rank

    @property
    def world(self) -> int:
        return self.batch * self.seq


# id(mesh) -> (a weak reference to the mesh, its info). Weak: a strong one would keep every mesh
# and its process groups (each with its own transport threads) alive after the user let go of it.
# By id, not by the mesh: meshes of equal shape compare equal, yet hold different groups.
_INFO_CACHE: dict[int, tuple[weakref.ref, MeshInfo]] = {}


def mesh_info(mesh: DeviceMesh) -> MeshInfo:
    """Read (once per mesh; collective on first use) the plain data of a para-fx mesh."""
    cached = _INFO_CACHE.get(id(mesh))
    if cached is not None and cached[0]() is mesh:
        return cached[1]
    names = tuple(mesh.mesh_dim_names or ())
    if names != MESH_DIMS:
        raise ValueError(
            f"para-fx needs a mesh with dims {MESH_DIMS} (use para_fx.init_mesh); got {names or 'unnamed dims'}"
        )
    sizes = dict(zip(names, mesh.shape))
    ranks = {n: mesh.get_local_rank(n) for n in names}
    groups = {n: mesh.get_group(n).group_name for n in names}
    if sizes["ring"] == 1:
        seq_group = groups["ulysses"]
    elif sizes["ulysses"] == 1:
        seq_group = groups["ring"]
    else:
        seq_group = mesh["ring", "ulysses"]._flatten("para_fx_seq").get_group().group_name
    info = MeshInfo(
        *(sizes[n] for n in names),
        *(ranks[n] for n in names),
        *(groups[n] for n in names),
        seq_group,
    )
    _INFO_CACHE[id(mesh)] = (weakref.ref(mesh), info)
    weakref.finalize(mesh, _INFO_CACHE.pop, id(mesh), None)
    return info


def chunk_sizes(length: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(x, parts)`` along a dim of ``length``: the first ``length % parts`` get one more."""
    base, extra = divmod(length, parts)
    return [base + (i < extra) for i in range(parts)]


def chunk_offsets(length: int, parts: int) -> list[int]:
    """Start index of each chunk of :func:`chunk_sizes`, plus the end."""
    offsets = [0]
    for size in chunk_sizes(length, parts):
        offsets.append(offsets[-1] + size)
    return offsets


@torch._dynamo.assume_constant_result
def _mesh_info_fields(mesh: DeviceMesh) -> tuple:
    return dataclasses.astuple(mesh_info(mesh))


def traceable_mesh_info(mesh: DeviceMesh) -> MeshInfo:
    """:func:`mesh_info` for code that torch.compile traces: read at trace time, baked in as constants."""
    return MeshInfo(*_mesh_info_fields(mesh))
