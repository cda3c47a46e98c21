"""Convolution over rows split across ranks: each rank borrows its neighbours' border rows (a halo).

A convolution whose window slides along the split dim with stride 1 and keeps its length (kernel
``2 * padding + 1``) needs, for this rank's rows, ``padding`` rows on each side: the neighbours'
border rows inside the tensor, zeros at its ends, as the convolution's own padding would give. One
all-to-all sends this rank's first rows to the rank before and its last rows to the rank after.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

aten = torch.ops.aten


def halo_convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *,
                     dim: int, halo: int, parts: int, rank: int, group: str) -> torch.Tensor:
    """``aten.convolution`` of this rank's rows along ``dim`` (ranks in order, contiguous rows),
    whose ``padding`` along ``dim`` is ``halo``."""
    spatial = input.dim() - 2
    padding = list(padding) * spatial if len(padding) == 1 else list(padding)
    padding[dim - 2] = 0  # the borders stand in for it
    above, below = exchange_borders(input, dim, halo, parts, rank, group)
    rows = with_borders(input, dim, halo, above, below)
    return aten.convolution(rows, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


def exchange_borders(x: torch.Tensor, dim: int, halo: int, parts: int, rank: int, group: str):
    """The previous rank's last ``halo`` rows and the next rank's first ones (None at the ends)."""
    first, last = rank == 0, rank == parts - 1
    sizes = [0] * parts  # sent to and received from each rank: the same
    if not first:
        sizes[rank - 1] = halo
    if not last:
        sizes[rank + 1] = halo
    rows = x.movedim(dim, 0)
    mine = [rows[:halo]] * (not first) + [rows[rows.shape[0] - halo :]] * (not last)  # to the rank before, after
    received = funcol.all_to_all_single(torch.cat(mine).contiguous(), sizes, sizes, group).movedim(0, dim)
    above = None if first else received.narrow(dim, 0, halo)
    below = None if last else received.narrow(dim, received.shape[dim] - halo, halo)
    return above, below


def with_borders(x: torch.Tensor, dim: int, halo: int, above: torch.Tensor | None, below: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the rows ``above`` and ``below`` it along ``dim``; ``halo`` rows of zeros where
    there is no neighbour (the ends of the whole tensor)."""
    zeros = x.new_zeros(*x.shape[:dim], halo, *x.shape[dim + 1 :])
    return torch.cat([zeros if above is None else above, x, zeros if below is None else below], dim)
