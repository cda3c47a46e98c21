"""Ranks must call a compiled graph with the same inputs: checked, not assumed.

para-fx takes the full inputs on every rank and splits them inside the graph. Ranks given
different latents or timesteps would all return the same wrong answer, a different shape would
abort inside a collective, and one extra call on one rank would wait in a collective until the
process group's timeout. So before a call the ranks compare a fingerprint of every input (dtype,
shape and two float64 sums of its values: one device sync, no collective) through the process
group's store, which can wait with a deadline where a collective cannot:

* ``"first"`` (the default): at the first call of each compiled graph and input shape;
* ``"every"``: at every call (debugging; also names a rank that called a different number of
  times), set per backend or with the environment variable ``PARA_FX_CHECK_INPUTS=every``;
* ``"off"``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .capture import flatten_subclasses

CHECK_MODES = ("first", "every", "off")
ENV_MODE = "PARA_FX_CHECK_INPUTS"
_GRAPH_IDS = itertools.count()  # ranks compile the same graphs in the same order, so ids agree


class InputsDiffer(RuntimeError):
    """Ranks called one compiled graph with different inputs; ``names`` are the inputs that differ."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


class RanksOutOfStep(RuntimeError):
    """Some ranks did not reach an input check: they called the model a different number of
    times, or compiled different graphs, or are still busy (see ``check_timeout``)."""


def check_mode(mode: str | None) -> str:
    """The mode asked for, else the environment's, else "first"."""
    mode = mode if mode is not None else os.environ.get(ENV_MODE, "first")
    if mode not in CHECK_MODES:
        raise ValueError(f"para_fx: check_inputs must be one of {CHECK_MODES}, got {mode!r}")
    return mode


def with_input_check(
    compiled: Callable[..., Any], names: Sequence[str], ranks: Sequence[int], mode: str, timeout: float
) -> Callable[..., Any]:
    """``compiled``, checking that ``ranks`` agree on its inputs first (as ``mode`` says)."""
    if mode == "off" or len(ranks) < 2 or dist.get_backend() == "fake":  # fake: explain's simulated ranks
        return compiled
    return _CheckedInputs(compiled, list(names), list(ranks), mode, timeout)


class _CheckedInputs:
    def __init__(self, compiled: Callable[..., Any], names: list[str], ranks: list[int], mode: str, timeout: float):
        self.compiled, self.names, self.ranks, self.mode, self.timeout = compiled, names, ranks, mode, timeout
        self.graph = next(_GRAPH_IDS)
        self.checks = 0
        self.seen: set[tuple] = set()

    def __call__(self, *args: Any) -> Any:
        signature = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in args)
        if self.mode == "every" or signature not in self.seen:
            self._check(args)
            self.seen.add(signature)
        return self.compiled(*args)

    def _check(self, args: Sequence[Any]) -> None:
        store = dist.distributed_c10d._get_default_store()
        rank = dist.get_rank()
        key = f"para_fx/inputs/{self.graph}/{self.checks}"
        store.set(f"{key}/{rank}", json.dumps(fingerprint(args)))
        try:
            store.wait([f"{key}/{r}" for r in self.ranks], datetime.timedelta(seconds=self.timeout))
        except RuntimeError as error:  # the store's timeout (DistStoreError is a RuntimeError)
            raise RanksOutOfStep(
                f"para_fx: ranks {_missing(store, key, self.ranks)} did not reach input check {self.checks + 1} of compiled graph "
                f"{self.graph} within {self.timeout:g}s (rank {rank} did). They called the model fewer "
                "times, compiled different graphs (inputs of another type or structure), or are still "
                "busy; every rank must make the same calls in the same order"
            ) from error
        prints = {r: json.loads(store.get(f"{key}/{r}")) for r in self.ranks}
        if self.checks >= 2:  # every rank is past check n-2 once all reached check n-1: its keys are read
            store.delete_key(f"para_fx/inputs/{self.graph}/{self.checks - 2}/{rank}")
        self.checks += 1
        _compare(prints, self.names)


def _missing(store: dist.Store, key: str, ranks: list[int]) -> list[int] | str:
    try:
        return [r for r in ranks if not store.check([f"{key}/{r}"])]
    except RuntimeError:  # the store went away with the rank that held it
        return "(unknown: the store is unreachable)"


def fingerprint(args: Sequence[Any]) -> list[str]:
    """Per input: ``f32[2, 35, 16] sum=... abs=...`` (float64 sums of the values), or its repr."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    sums = [_sums(t) for t in tensors]
    rows: list[list[float]] = [[]] * len(sums)
    by_device: dict[torch.device, list[int]] = {}
    for i, pair in enumerate(sums):
        by_device.setdefault(pair.device, []).append(i)
    for positions in by_device.values():  # one copy to the host per device
        for i, row in zip(positions, torch.stack([sums[i] for i in positions]).tolist()):
            rows[i] = row
    rows_of = iter(rows)
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            total, magnitude = next(rows_of)
            out.append(f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)} sum={total!r} abs={magnitude!r}")
        else:
            out.append(repr(a))
    return out


def _sums(x: torch.Tensor) -> torch.Tensor:
    parts = flatten_subclasses([x])  # torchao's weights: their inner tensors
    values = [torch.view_as_real(p) if p.is_complex() else p for p in parts]  # both halves count
    values = [v if v.is_floating_point() and v.element_size() >= 2 else v.to(torch.float64) for v in values]
    return torch.stack(
        [sum(v.sum(dtype=torch.float64) for v in values), sum(v.abs().sum(dtype=torch.float64) for v in values)]
    )


def _compare(prints: dict[int, list[str]], names: list[str]) -> None:
    differ = [
        i for i in range(max(len(p) for p in prints.values()))
        if len({p[i] if i < len(p) else None for p in prints.values()}) > 1
    ]
    if not differ:
        return
    named = [names[i] if i < len(names) else f"input {i}" for i in differ]
    first = differ[0]
    values = "; ".join(f"rank {r}: {p[first] if first < len(p) else '(none)'}" for r, p in sorted(prints.items()))
    more = f" (and {', '.join(named[1:])})" if len(named) > 1 else ""
    raise InputsDiffer(
        f"para_fx: ranks called a compiled graph with different input '{named[0]}'{more}: "
        f"{values}. Every rank must pass the same inputs (same latents, timesteps, prompts and weights: "
        "seed every rank alike); para-fx splits them itself",
        named,
    )
