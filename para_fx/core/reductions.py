"""Inductor's persistent reductions, widened to rows of up to :data:`PERSISTENT_ROW_LIMIT` values.

Inductor keeps a reduction along contiguous rows persistent (the whole row in registers, read
once) only up to 1024 values; a wider row is reduced in a loop and read again by whatever the
kernel does with the result. A DiT's per-row fp8 quantisation of a 12288-15360 wide activation
(a feed-forward's gelu, a single block's ``cat(attention, gelu(mlp))``) then reads each row twice,
once for its amax and once to quantise. Inductor picks its heuristics through a replaceable
``InductorChoices`` object (``config.inductor_choices_class``); :class:`WideRowReductions` is one
that keeps those rows persistent, and :func:`choices_of` installs the one a compile's config names.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

PERSISTENT_ROW_LIMIT = 16384  # FLUX's widest quantised row: 3072 + 12288 values, rounded up


class WideRowReductions(InductorChoices):
    """Inductor's choices, with reductions along contiguous rows of up to
    :data:`PERSISTENT_ROW_LIMIT` values persistent."""

    @staticmethod
    def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
        if (
            not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_LIMIT)
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


@contextlib.contextmanager
def choices_of(patches: Mapping[str, Any]) -> Iterator[None]:
    """Inductor's choices object for a compile under config ``patches``.

    Inductor builds the object its config names once per thread, at the thread's first compile,
    and keeps it: a config patch alone reaches that first compile or none. The class the patches
    name (part of the FX graph cache's key) is installed for this compile only.
    """
    choices_class = patches.get("inductor_choices_class")
    if choices_class is None:
        yield
        return
    with V.set_choices_handler(choices_class()):
        yield
