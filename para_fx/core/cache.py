"""First Block Cache: the user's settings.

    cache = para_fx.FirstBlockCache(threshold=0.08)
    model = torch.compile(model, backend=para_fx.backend(cache=cache))

A :class:`FirstBlockCache` holds settings only, checked at every assignment; the state of the
models that use it lives at step time, in :mod:`para_fx.runtime.cache`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable


@dataclasses.dataclass(eq=False)
class FirstBlockCache:
    """Skip the middle transformer blocks while the first blocks' residual barely changes.

    ``threshold``: relative L1 change of the first blocks' residual below which a step is
    skipped (0 never skips). ``warmup_steps``: steps always computed at the start of a session.
    ``max_consecutive_skips``: None for no cap. ``compute_first`` / ``compute_last``: blocks
    always computed at the start / end of the block stack.

    Every assignment is checked, not only the constructor's: the runtime reads ``threshold``,
    ``warmup_steps`` and ``max_consecutive_skips`` at each call, so they may be changed between
    calls, while ``compute_first`` / ``compute_last`` are compiled into the graph and are fixed.
    """

    threshold: float = 0.08
    warmup_steps: int = 0
    max_consecutive_skips: int | None = None
    compute_first: int = 1
    compute_last: int = 0

    def __setattr__(self, name: str, value: Any) -> None:
        check = _CHECKS.get(name)
        if check is not None:
            if name in _COMPILED and "_built" in self.__dict__:
                raise AttributeError(
                    f"FirstBlockCache: {name} is compiled into the graph; make a new FirstBlockCache "
                    "(and compile again) to change it"
                )
            value = check(name, value)
        object.__setattr__(self, name, value)

    def __post_init__(self):
        object.__setattr__(self, "_built", True)


def _threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"FirstBlockCache: {name} must be a number, got {type(value).__name__} {value!r}")
    if not value >= 0:  # NaN too
        raise ValueError(f"FirstBlockCache: {name} must be >= 0, got {value}")
    return float(value)


def _count(least: int, optional: bool = False) -> Callable[[str, Any], int | None]:
    def check(name: str, value: Any) -> int | None:
        if optional and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            kind = "None or an int" if optional else "an int"
            raise TypeError(f"FirstBlockCache: {name} must be {kind}, got {type(value).__name__} {value!r}")
        if value < least:
            why = " (its residual drives the decision)" if name == "compute_first" else ""
            raise ValueError(f"FirstBlockCache: {name} must be >= {least}{why}, got {value}")
        return value

    return check


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "threshold": _threshold,
    "warmup_steps": _count(0),
    "max_consecutive_skips": _count(0, optional=True),
    "compute_first": _count(1),
    "compute_last": _count(0),
}
_COMPILED = ("compute_first", "compute_last")
