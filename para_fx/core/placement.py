"""Placements of a tensor over one mesh group, as plain data.

``Shard(dim, layout)``: dimension ``dim`` is split across the group. ``layout`` is a tuple of
segments ``(count, unit)``: the dim is the concatenation of the segments, segment ``i`` holds
``count * unit`` items, and rank ``r`` holds chunk ``r`` of ``torch.tensor_split(range(count), n)``
of it (in units of ``unit`` contiguous items), segment after segment. A plainly split dim of
size S is ``((S, 1),)``; ``cat([txt, img])`` of two split streams is ``((512, 1), (4096, 1))``;
flattening ``[B, S]`` with S split gives ``((S, 1),) * B``; flattening ``[S, D]`` gives ``((S, D),)``.
Attention does not care about token order, so any layout is fine as long as q, k and v agree.
"""

from __future__ import annotations

import dataclasses

from .mesh import chunk_offsets, chunk_sizes

Layout = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Replicate:
    def __repr__(self) -> str:
        return "R"


@dataclasses.dataclass(frozen=True)
class Shard:
    dim: int
    layout: Layout

    def __repr__(self) -> str:
        if len(self.layout) == 1 and self.layout[0][1] == 1:
            return f"S({self.dim})"
        return f"S({self.dim}, {list(self.layout)})"


@dataclasses.dataclass(frozen=True)
class Partial:
    reduce: str  # "sum", "max" or "min"

    def __repr__(self) -> str:
        return f"P({self.reduce})"


Placement = Replicate | Shard | Partial
# for reports: how placements print
PLACEMENT_LEGEND = (
    "placements: R replicated (whole on every rank); S(d) split along dim d over the ranks; "
    "S(d, [(n, u), ...]) dim d is segments of n units of u elements, each segment split over the ranks "
    "(FLUX: [(7, 1), (35, 1)] is 7 text then 35 image tokens); P(op) partial results awaiting a reduce"
)
REPLICATE = Replicate()


def plain(size: int) -> Layout:
    return ((size, 1),)


def global_size(layout: Layout) -> int:
    return sum(count * unit for count, unit in layout)


def local_size(layout: Layout, parts: int, rank: int) -> int:
    return sum(chunk_sizes(count, parts)[rank] * unit for count, unit in layout)


def local_ranges(layout: Layout, parts: int, rank: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the global ranges rank ``rank`` holds, in local order."""
    ranges, base = [], 0
    for count, unit in layout:
        offsets = chunk_offsets(count, parts)
        length = (offsets[rank + 1] - offsets[rank]) * unit
        if length:
            ranges.append((base + offsets[rank] * unit, length))
        base += count * unit
    return ranges


def normalize(layout: Layout) -> Layout:
    """Drop empty segments; the same split pattern always gets the same tuple."""
    return tuple((c, u) for c, u in layout if c * u)


def scale_units(layout: Layout, factor: int) -> Layout:
    return tuple((c, u * factor) for c, u in layout)


def repeat(layout: Layout, times: int) -> Layout:
    return layout * times


def factor_layout(layout: Layout, outer: int, inner: int) -> Layout | None:
    """The layout L of one dim such that ``repeat(scale_units(L, inner), outer) == layout``, if any."""
    if outer < 1 or len(layout) % outer:
        return None
    period = len(layout) // outer
    first = layout[:period]
    if layout != first * outer or any(unit % inner for _, unit in first):
        return None
    return tuple((c, u // inner) for c, u in first)


def same_split(a: Layout, b: Layout, parts: int) -> bool:
    """Whether two layouts give every one of ``parts`` ranks the same global ranges: ``((1024, 1),)``
    and ``((32, 32),)`` (1024 tokens, or 32 rows of 32) do when ``parts`` divides 32."""
    return all(_merged(local_ranges(a, parts, r)) == _merged(local_ranges(b, parts, r)) for r in range(parts))


def in_units(layout: Layout, unit: int, parts: int) -> Layout | None:
    """A layout that splits like ``layout`` over ``parts`` ranks and whose units are multiples of
    ``unit`` (whole rows of ``unit`` items), if there is one."""
    out = []
    for count, size in layout:
        if size % unit:
            if (count * size) % unit:
                return None
            count, size = count * size // unit, unit
        out.append((count, size))
    out = tuple(out)
    return out if same_split(out, layout, parts) else None


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent ``(start, length)`` ranges joined."""
    out: list[tuple[int, int]] = []
    for start, length in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out
