"""First Block Cache: the user's settings, and the runtime that owns the cache state.

The graph (see :mod:`para_fx.passes.cache`) decides each step whether to skip; this module
decides whether skipping is *allowed* (warmup, the cap on consecutive skips, threshold 0), keeps
the state of every call context between steps, and counts what happened.

    cache = para_fx.FirstBlockCache(threshold=0.08)
    model = torch.compile(model, backend=para_fx.backend(cache=cache))
    with para_fx.cache_session(model):          # one generation: fresh state
        for t in timesteps:
            with para_fx.cache_context(model, "cond"):
                v_cond = model(x, t, text)
            with para_fx.cache_context(model, "uncond"):
                v_uncond = model(x, t, empty)
    print(para_fx.cache_stats(model))           # steps, computed, skipped, diffs
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from typing import Any, Callable, Iterator

import torch

from .passes.cache import CacheLayout


@dataclasses.dataclass
class CacheStats:
    """What the cache did in a session: calls of the cached graph, and the change seen at each."""

    steps: int = 0
    computed: int = 0
    skipped: int = 0
    diffs: list[float] = dataclasses.field(default_factory=list)  # one per step after a context's first


@dataclasses.dataclass
class _ContextState:
    prefix: list[torch.Tensor] | None = None  # the prefix residual of the last computed step
    region: list[torch.Tensor] | None = None  # the skipped blocks' residual of the last computed step
    steps: int = 0
    consecutive_skips: int = 0


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
            if name in _COMPILED and "_states" in self.__dict__:
                raise AttributeError(
                    f"FirstBlockCache: {name} is compiled into the graph; make a new FirstBlockCache "
                    "(and compile again) to change it"
                )
            value = check(name, value)
        object.__setattr__(self, name, value)

    def __post_init__(self):
        self._states: dict[tuple[str, int], _ContextState] = {}
        self._context = "default"
        self._stats = CacheStats()
        self._last_session: CacheStats | None = None

    def reset(self) -> None:
        """Forget every context's state and start counting afresh."""
        self._states.clear()
        self._stats = CacheStats()

    def _may_skip(self, state: _ContextState) -> bool:
        return (
            state.prefix is not None
            and state.steps >= self.warmup_steps
            and self.threshold > 0
            and (self.max_consecutive_skips is None or state.consecutive_skips < self.max_consecutive_skips)
        )

    def _record(self, state: _ContextState, diff: float | None, skipped: bool) -> None:
        state.steps += 1
        state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
        self._stats.steps += 1
        self._stats.skipped += skipped
        self._stats.computed += not skipped
        if diff is not None:
            self._stats.diffs.append(diff)


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


class CachedGraph:
    """A compiled graph with the cache pass's extra inputs and outputs, called like the original."""

    def __init__(self, compiled: Callable[..., Any], layout: CacheLayout, cache: FirstBlockCache):
        self.compiled = compiled
        self.layout = layout
        self.cache = cache
        self._scalars: dict[tuple[bool, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def _flags(self, allow: bool, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The (allow_skip, threshold) inputs, made once per value: no host-to-device copy per step."""
        key = (allow, threshold)
        if key not in self._scalars:
            device = self.layout.prefix_state[0].device
            self._scalars[key] = (
                torch.tensor(allow, device=device),
                torch.tensor(threshold, dtype=torch.float32, device=device),
            )
        return self._scalars[key]

    def __call__(self, *args: Any) -> Any:
        cache, layout = self.cache, self.layout
        state = cache._states.setdefault((cache._context, id(self)), _ContextState())
        allow = cache._may_skip(state)
        prefix = state.prefix or [spec.zeros() for spec in layout.prefix_state]
        region = state.region or [spec.zeros() for spec in layout.region_state]
        with torch.no_grad():  # inference only: the stored residuals must not keep an autograd graph alive
            outs = self.compiled(*args, *prefix, *region, *self._flags(allow, cache.threshold))
        n, k, m = layout.user_outputs, len(prefix), len(region)
        skipped = bool(outs[n + k + m + 1])
        diff = float(outs[n + k + m]) if state.prefix is not None else None
        if not skipped:  # a skip keeps comparing against the last computed step
            state.prefix = list(outs[n : n + k])
        state.region = list(outs[n + k : n + k + m])
        cache._record(state, diff, skipped)
        return outs[:n]


def cache_of(obj: Any) -> FirstBlockCache:
    """The FirstBlockCache behind a compiled model, a para backend, or the cache itself."""
    from .backend import ParaBackend

    todo, seen = [obj], set()
    while todo:
        item = todo.pop()
        if id(item) in seen or item is None:
            continue
        seen.add(id(item))
        if isinstance(item, FirstBlockCache):
            return item
        if isinstance(item, ParaBackend) and item.options.cache is not None:
            return item.options.cache
        # torch.compile's wrappers: OptimizedModule -> context -> callback -> ... -> backend
        for attr in ("dynamo_ctx", "callback", "_torchdynamo_orig_backend", "compiler_fn", "_torchdynamo_orig_callable"):
            todo.append(getattr(item, attr, None))
    raise ValueError(
        f"{type(obj).__name__} has no First Block Cache: compile it with "
        "torch.compile(model, backend=para_fx.backend(cache=para_fx.FirstBlockCache(...)))"
    )


@contextlib.contextmanager
def cache_session(model: Any) -> Iterator[FirstBlockCache]:
    """One generation: fresh cache state on entry; :func:`cache_stats` reports it after exit."""
    cache = cache_of(model)
    cache.reset()
    cache._last_session = None
    try:
        yield cache
    finally:
        cache._last_session = dataclasses.replace(cache._stats, diffs=list(cache._stats.diffs))


@contextlib.contextmanager
def cache_context(model: Any, name: str) -> Iterator[FirstBlockCache]:
    """Calls inside use the cache state named ``name`` (e.g. "cond" and "uncond" per step)."""
    cache = cache_of(model)
    outer, cache._context = cache._context, name
    try:
        yield cache
    finally:
        cache._context = outer


def cache_stats(model: Any) -> CacheStats:
    """The last finished :func:`cache_session`'s record; inside a session or without one, the running count."""
    cache = cache_of(model)
    stats = cache._last_session or cache._stats
    return dataclasses.replace(stats, diffs=list(stats.diffs))
