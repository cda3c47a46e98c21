"""Redistributions between placements, written with functional collectives.

The shard pass inserts calls to these functions; ``inline_helpers`` inlines them as aten ops
and ``_c10d_functional`` collectives that Inductor can schedule. The all-gather calls the
``_c10d_functional`` op itself: its Python wrapper was renamed between torch 2.11
(``all_gather_tensor``) and 2.13 (``all_gather_single``, the old name warning), the op was not.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from ..core.placement import Layout, local_ranges, local_size


def take_local(x: torch.Tensor, dim: int, layout: Layout, parts: int, rank: int) -> torch.Tensor:
    """Replicate -> Shard: this rank's part of a full tensor (a slice, or a cat of slices)."""
    pieces = [x.narrow(dim, start, length) for start, length in local_ranges(layout, parts, rank)]
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return x.narrow(dim, 0, 0)
    return torch.cat(pieces, dim)


def gather(x: torch.Tensor, dim: int, layout: Layout, parts: int, group: str) -> torch.Tensor:
    """Shard -> Replicate: all-gather the (possibly uneven, segmented) chunks into global order."""
    sizes = [local_size(layout, parts, r) for r in range(parts)]
    longest = max(sizes)
    x = x.movedim(dim, 0)
    if x.shape[0] < longest:
        x = torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1) + [0, longest - x.shape[0]])
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), parts, group)
    gathered = torch.ops._c10d_functional.wait_tensor(gathered).view(parts, longest, *x.shape[1:])
    pieces = []
    for segment in range(len(layout)):
        for rank in range(parts):
            start, length = _local_segment(layout, parts, rank, segment)
            if length:
                pieces.append(gathered[rank, start : start + length])
    return torch.cat(pieces, 0).movedim(0, dim)


def _local_segment(layout: Layout, parts: int, rank: int, segment: int) -> tuple[int, int]:
    """Offset and length, in this rank's local tensor, of its piece of ``segment``."""
    offset = sum(local_size(layout[i : i + 1], parts, rank) for i in range(segment))
    return offset, local_size(layout[segment : segment + 1], parts, rank)


def reduce(x: torch.Tensor, op: str, group: str) -> torch.Tensor:
    """Partial -> Replicate."""
    return funcol.all_reduce(x, op, group)


def in_memory_order(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``x`` with its dims laid out in memory in ``order`` (outermost first); a no-op when they already are."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return x.permute(order).contiguous().permute(inverse)
