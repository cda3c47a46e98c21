"""First Block Cache at step time: the state of every model that uses one set of settings.

The graph (see :mod:`para_fx.passes.cache`) decides each step whether to skip, one decision
agreed by every rank, and counts the skips in a row; this module says whether this rank *allows*
skipping (warmup, threshold 0) and passes the cap on skips in a row, keeps the state of every
model instance and call context between steps, and counts what happened. A step never waits for
the GPU here: the decisions and changes stay on the device until :func:`cache_stats` (or the end
of a session) reads them. The settings are :mod:`para_fx.core.cache`'s.

    cache = para_fx.FirstBlockCache(threshold=0.08)
    model = torch.compile(model, backend=para_fx.backend(cache=cache))
    with para_fx.cache_session(model):          # one generation: fresh state
        for t in timesteps:
            with para_fx.cache_context(model, "cond"):
                v_cond = model(x, t, text)
            with para_fx.cache_context(model, "uncond"):
                v_uncond = model(x, t, empty)
    print(para_fx.cache_stats(model))           # steps, computed, skipped, diffs

:class:`FirstBlockCache` is only the settings. The state lives in a :class:`CacheRuntime` per
settings object, keyed by model instance, context and graph: Dynamo passes weights as graph
inputs, so two models of one architecture share a compiled graph, and a graph cannot hold the
state of either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from typing import Any, Callable, Iterator

import torch

from ..core.cache import FirstBlockCache
from ..passes.cache import CacheLayout


@dataclasses.dataclass
class CacheStats:
    """What the cache did in a session: calls of the cached graph, and the change seen at each."""

    steps: int = 0
    computed: int = 0
    skipped: int = 0
    diffs: list[float] = dataclasses.field(default_factory=list)  # one per step after a context's first

    def __add__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(
            self.steps + other.steps, self.computed + other.computed, self.skipped + other.skipped, self.diffs + other.diffs
        )


@dataclasses.dataclass
class _ContextState:
    prefix: list[torch.Tensor] | None = None  # the prefix residual to compare the next step with
    region: list[torch.Tensor] | None = None  # the skipped blocks' residual of the last computed step
    consecutive: torch.Tensor | None = None  # skips in a row, counted by the graph
    steps: int = 0

    def may_skip(self, cache: FirstBlockCache) -> bool:
        """Whether this rank lets the graph skip this context's next step (the graph asks every
        rank, and checks the cap on skips in a row itself)."""
        return self.prefix is not None and self.steps >= cache.warmup_steps and cache.threshold > 0


_READ_EVERY = 1024  # calls a tally keeps on the device before it reads them


@dataclasses.dataclass
class _Tally:
    """One owner's calls: counted on the host up to the last read, the newer ones still on the device."""

    counted: CacheStats = dataclasses.field(default_factory=CacheStats)
    skipped: list[torch.Tensor] = dataclasses.field(default_factory=list)  # one bool per call not yet read
    diffs: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def add(self, skipped: torch.Tensor, diff: torch.Tensor | None) -> None:
        self.skipped.append(skipped)
        if diff is not None:
            self.diffs.append(diff)
        if len(self.skipped) >= _READ_EVERY:  # a long run outside any session: bounded memory
            self.read()

    def read(self) -> CacheStats:
        """The counts so far (one wait for the GPU if calls are pending)."""
        if self.skipped:
            skipped = int(torch.stack(self.skipped).sum())
            steps = len(self.skipped)
            diffs = torch.stack(self.diffs).tolist() if self.diffs else []
            self.counted = self.counted + CacheStats(steps, steps - skipped, skipped, diffs)
            self.skipped, self.diffs = [], []
        return self.counted


Owners = frozenset  # the ids of one model's parameters; None: every model using the cache


class CacheRuntime:
    """The cache state of every model that uses one :class:`FirstBlockCache`.

    A call's model is told by the first parameter its graph reads (the call's *owner* token: the
    id of that parameter, None for a graph that reads none). A compiled model is the set of its
    parameters' ids; the settings object itself stands for every model that uses it.
    """

    def __init__(self):
        self.states: dict[tuple[int | None, str, int], _ContextState] = {}  # (owner, context, graph)
        self.counts: dict[int | None, _Tally] = {}  # running counts per owner
        self.sessions: dict[Owners | None, CacheStats] = {}  # the last finished session's, per model
        self.contexts: dict[Owners | None, str] = {None: "default"}  # the context each model calls in
        self.model_of: dict[int, Owners] = {}  # owner token -> the model that named a context

    def state(self, owner: int | None, graph: int) -> _ContextState:
        model = self.model_of.get(owner)
        context = self.contexts.get(model, self.contexts[None])
        return self.states.setdefault((owner, context, graph), _ContextState())

    def record(self, owner: int | None, state: _ContextState, diff: torch.Tensor | None, skipped: torch.Tensor) -> None:
        state.steps += 1
        self.counts.setdefault(owner, _Tally()).add(skipped, diff)

    def reset(self, model: Owners | None) -> None:
        """Forget ``model``'s state and counts (every model's for None); graphs with no parameter
        input belong to every model."""
        mine = lambda owner: model is None or owner is None or owner in model
        self.states = {key: state for key, state in self.states.items() if not mine(key[0])}
        self.counts = {owner: counts for owner, counts in self.counts.items() if not mine(owner)}
        self.sessions.pop(model, None)

    def running(self, model: Owners | None) -> CacheStats:
        mine = [tally.read() for owner, tally in self.counts.items() if model is None or owner is None or owner in model]
        return sum(mine, CacheStats())

    def name_context(self, model: Owners | None, name: str | None) -> str | None:
        """Make ``model`` call in context ``name`` (None: as every model does); returns the previous name."""
        previous = self.contexts.get(model)
        if model is not None:
            self.model_of.update(dict.fromkeys(model, model))
        if name is None:
            self.contexts.pop(model, None)
        else:
            self.contexts[model] = name
        return previous


_RUNTIMES: "weakref.WeakKeyDictionary[FirstBlockCache, CacheRuntime]" = weakref.WeakKeyDictionary()


def runtime_of(cache: FirstBlockCache) -> CacheRuntime:
    """The state kept for ``cache``'s models (made on first use)."""
    runtime = _RUNTIMES.get(cache)
    if runtime is None:
        runtime = _RUNTIMES[cache] = CacheRuntime()
    return runtime


class CachedGraph:
    """A compiled cache graph, called like the original: threads the caller's state through it.

    ``owner_input``: position of the first parameter among the inputs, which tells the model.
    """

    def __init__(self, compiled: Callable[..., Any], layout: CacheLayout, cache: FirstBlockCache, owner_input: int | None):
        self.compiled = compiled
        self.layout = layout
        self.cache = cache
        self.owner_input = owner_input
        self._scalars: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _settings(self, allow: bool) -> tuple[torch.Tensor, ...]:
        """The (allow_skip, threshold, max_skips) inputs, made once per value: no host-to-device
        copy per step."""
        cache = self.cache
        cap = math.inf if cache.max_consecutive_skips is None else float(cache.max_consecutive_skips)
        key = (allow, cache.threshold, cap)
        if key not in self._scalars:
            self._scalars[key] = tuple(self.layout.scalar(value) for value in key)
        return self._scalars[key]

    def __call__(self, *args: Any) -> Any:
        layout, runtime = self.layout, runtime_of(self.cache)
        owner = None if self.owner_input is None else id(args[self.owner_input])
        state = runtime.state(owner, id(self))
        prefix = state.prefix or [spec.zeros() for spec in layout.prefix_state]
        region = state.region or [spec.zeros() for spec in layout.region_state]
        consecutive = layout.scalar(0.0) if state.consecutive is None else state.consecutive
        settings = self._settings(state.may_skip(self.cache))
        with torch.no_grad():  # inference only: the stored residuals must not keep an autograd graph alive
            step = layout.split(self.compiled(*layout.inputs(args, prefix, region, consecutive, *settings)))
        compared = state.prefix is not None
        state.prefix, state.region, state.consecutive = step.prefix, step.region, step.consecutive
        runtime.record(owner, state, step.diff if compared else None, step.skipped)
        return step.outputs


def _target(obj: Any) -> tuple[FirstBlockCache, Owners | None]:
    """The FirstBlockCache behind a compiled model, a para backend or the cache itself, and the
    model it names (None: every model that uses the cache)."""
    model = getattr(obj, "_orig_mod", None)
    owners = frozenset(id(p) for p in model.parameters()) if isinstance(model, torch.nn.Module) else None
    todo, seen = [obj], set()
    while todo:
        item = todo.pop()
        if id(item) in seen or item is None:
            continue
        seen.add(id(item))
        if isinstance(item, FirstBlockCache):
            return item, owners
        cache = getattr(getattr(item, "options", None), "cache", None)  # a para backend's
        if isinstance(cache, FirstBlockCache):
            return cache, owners
        # torch.compile's wrappers: OptimizedModule -> context -> callback -> ... -> backend
        for attr in ("dynamo_ctx", "callback", "_torchdynamo_orig_backend", "compiler_fn", "_torchdynamo_orig_callable"):
            todo.append(getattr(item, attr, None))
    raise ValueError(
        f"{type(obj).__name__} has no First Block Cache: compile it with "
        "torch.compile(model, backend=para_fx.backend(cache=para_fx.FirstBlockCache(...)))"
    )


@contextlib.contextmanager
def cache_session(model: Any) -> Iterator[FirstBlockCache]:
    """One generation of ``model``: fresh state on entry; :func:`cache_stats` reports it after exit.

    On a compiled model it touches that model's state only; on the FirstBlockCache (or the
    backend), every model's that uses it.
    """
    cache, owners = _target(model)
    runtime = runtime_of(cache)
    runtime.reset(owners)
    try:
        yield cache
    finally:
        runtime.sessions[owners] = runtime.running(owners)


@contextlib.contextmanager
def cache_context(model: Any, name: str) -> Iterator[FirstBlockCache]:
    """Calls of ``model`` inside use the cache state named ``name`` (e.g. "cond" and "uncond" per
    step); on the FirstBlockCache, calls of every model that names no context of its own."""
    cache, owners = _target(model)
    runtime = runtime_of(cache)
    outer = runtime.name_context(owners, name)
    try:
        yield cache
    finally:
        runtime.name_context(owners, outer)


def cache_stats(model: Any) -> CacheStats:
    """The last finished :func:`cache_session`'s record; inside a session or without one, the running count."""
    cache, owners = _target(model)
    runtime = runtime_of(cache)
    stats = runtime.sessions.get(owners) or runtime.running(owners)
    return dataclasses.replace(stats, diffs=list(stats.diffs))
