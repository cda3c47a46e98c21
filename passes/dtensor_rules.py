"""The long tail of aten ops, answered by DTensor's sharding propagation.

para's own rules (:mod:`para_fx.passes.shard_rules`) know segmented and uneven layouts; DTensor,
maintained with PyTorch, knows far more ops. For an op para has no rule for, this asks DTensor
which placements it propagates on a one-dim mesh of the group's size, and keeps the answer only
where it carries over to para's layouts unchanged: no sharded input redistributed, no size
argument to localise, every sharded output dim as long as the input's sharded dim (so it keeps
that dim's layout), and partial results only as sums, maxima or minima.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.fx as fx
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial as DPartial
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import OpSchema

from para_fx.core.placement import REPLICATE, Partial, Placement, Shard, global_size

log = logging.getLogger("para_fx")

_REDUCTIONS = {"sum": "sum", "max": "max", "min": "min"}


def dtensor_placements(
    node: fx.Node, pl: dict[fx.Node, Placement], parts: int, rank: int
) -> tuple[dict[fx.Node, Placement], Placement | list[Placement]] | None:
    """(input placements, output placement(s)) for ``node`` as DTensor propagates them, or None
    when DTensor has no strategy, would move a sharded input, or answers in a way para's
    layouts cannot carry."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    propagator = DTensor._op_dispatcher.sharding_propagator
    if node.target in propagator.op_to_shape_and_stride_idx:
        return None  # its size arguments would have to be localised
    inputs = _tensor_inputs(node)
    sharded = [pl[a] for a in inputs if isinstance(pl[a], Shard)]
    if not sharded or any(isinstance(pl[a], Partial) for a in inputs):
        return None
    layout = sharded[0].layout
    if any(p.layout != layout or _val(a).shape[p.dim] != global_size(layout) for a in inputs if isinstance(p := pl[a], Shard)):
        return None
    mesh = _mesh(parts, rank)
    to_spec = lambda a: _spec(mesh, _val(a), pl[a]) if a in pl and isinstance(_val(a), torch.Tensor) else a
    args = fx.node.map_aggregate(node.args, lambda a: to_spec(a) if isinstance(a, fx.Node) else a)
    kwargs = fx.node.map_aggregate(node.kwargs, lambda a: to_spec(a) if isinstance(a, fx.Node) else a)
    try:
        schema = OpSchema(node.target, tuple(args), dict(kwargs), schema_info=propagator.op_to_schema_info.get(node.target))
        # Uncached: the cache keys an op's non-tensor arguments only where DTensor registered them.
        sharding = propagator.propagate_op_sharding_non_cached(schema)
    except Exception as error:  # no strategy for this op, or one that rejects these arguments
        log.debug("para_fx: DTensor has no sharding for %s: %s", node.target, error)
        return None
    if sharding.needs_redistribute:
        return None
    out = _placements(sharding.output_spec, layout)
    if out is None:
        return None
    return {a: pl[a] for a in inputs}, out


def _placements(spec: Any, layout) -> Placement | list[Placement] | None:
    if isinstance(spec, (tuple, list)):
        outs = [_placements(s, layout) if s is not None else REPLICATE for s in spec]
        return None if any(o is None for o in outs) else outs
    if not isinstance(spec, DTensorSpec):
        return None
    (p,) = spec.placements
    if isinstance(p, DReplicate):
        return REPLICATE
    if isinstance(p, DShard):
        return Shard(p.dim, layout) if spec.tensor_meta.shape[p.dim] == global_size(layout) else None
    if isinstance(p, DPartial) and p.reduce_op in _REDUCTIONS:
        return Partial(_REDUCTIONS[p.reduce_op])
    return None


def _spec(mesh, value: torch.Tensor, placement: Placement) -> DTensorSpec:
    dplacement = DShard(placement.dim) if isinstance(placement, Shard) else DReplicate()
    return DTensorSpec(mesh, (dplacement,), TensorMeta(value.shape, value.stride(), value.dtype))


@functools.lru_cache(maxsize=None)
def _mesh(parts: int, rank: int):
    """A one-dim mesh of the group's size with no process group behind it: propagation only reads its shape."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", torch.arange(parts), _init_backend=False, _rank=rank)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if isinstance(_val(a), torch.Tensor) and a not in found else None)
    return found
