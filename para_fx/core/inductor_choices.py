"""Inductor's heuristics as para compiles with them: rows up to
:data:`~para_fx.core.reductions.PERSISTENT_ROW_LIMIT` values reduced persistently.

Inductor picks its heuristics through a replaceable ``InductorChoices`` object
(``config.inductor_choices_class``); :class:`WideRowReductions` is one, and :func:`choices_of`
installs the one a compile's config names. Imported when Inductor compiles (its heuristics module
costs seconds to import).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from para_fx.core.reductions import PERSISTENT_ROW_LIMIT


class WideRowReductions(InductorChoices):
    """Inductor's choices, with reductions along contiguous rows of up to
    :data:`~para_fx.core.reductions.PERSISTENT_ROW_LIMIT` values persistent."""

    def uuid(self) -> str:
        """Its part of the key of Inductor's FX graph cache (torch 2.13 asks; 2.11 pickles the class)."""
        return f"para_fx.WideRowReductions(rows<={PERSISTENT_ROW_LIMIT})"

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
