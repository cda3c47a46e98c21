"""The multi-process numeric tier: one spawn of N gloo ranks per world size runs every case
registered for that size, and each test asserts on its own case.

Spawning ranks costs seconds of start-up (torch, diffusers, Dynamo) per spawn; one spawn per world
size pays it once. A case is a module-level function (the ranks import it by name) registered with
``add(world, name, fn, *args)`` when its test module is imported. On every rank each case runs in a
process group of its own (a case that raises halfway leaves nothing for the next one to trip on),
and its result, or its traceback, is sent to the parent as soon as it finishes. So a case that
fails fails its own test only; a rank that dies or hangs fails the cases it did not finish, with
the reason, and the whole spawn is killed after ``timeout`` seconds: nothing hangs.

    python -m pytest -q -m ranks tests      # this tier alone
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import time
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from para_fx.launch import free_port

COLLECTIVE_TIMEOUT = 300  # s: a rank waiting longer in one collective raises (a case bug, not a slow CPU)
SPAWN_TIMEOUT = {2: 1200, 3: 300, 4: 1500}  # s for a whole spawn, on a busy 2-core machine

_CASES: dict[int, dict[str, tuple]] = {}
_RESULTS: dict[int, dict[str, list]] = {}
SECONDS: dict[tuple[int, str], tuple[float, float]] = {}  # (world, case) -> rank 0's wall and CPU seconds


def add(world: int, name: str, fn: Callable, *args: Any, prepared: Callable[[], Any] | None = None) -> None:
    """Register ``fn(*args)`` to run on every rank of the world-``world`` spawn.

    ``prepared``: a function the parent calls just before the spawn, whose value is passed as the
    last argument: what is costly to make (single-process references) is made once, not at import
    and not on every rank.
    """
    cases = _CASES.setdefault(world, {})
    assert name not in cases, f"case {name!r} registered twice at world {world}"
    cases[name] = (fn, args, prepared)


def result(world: int, name: str) -> list:
    """Every rank's return value of case ``name``; fails the calling test if a rank did not return one."""
    if world not in _RESULTS:
        _RESULTS[world] = _spawn(world)
    outcomes = _RESULTS[world][name]
    failed = [f"rank {rank}: {text}" for rank, (ok, text) in enumerate(outcomes) if not ok]
    if failed:  # every failing rank: the one that raised first may not be the first rank
        pytest.fail(f"case {name!r} at world {world}\n" + "\n".join(failed), pytrace=False)
    return [value for _, value in outcomes]


def _spawn(world: int) -> dict[str, list]:
    """Run every registered case on ``world`` ranks; per case, per rank, (True, value) or (False, why)."""
    names = list(_CASES[world])
    outcomes: dict[str, list] = {name: [None] * world for name in names}
    cases = []
    for name, (fn, args, prepared) in _CASES[world].items():
        try:
            cases.append((name, fn, args if prepared is None else (*args, prepared())))
        except Exception:  # noqa: BLE001 - this case fails, the others run
            outcomes[name] = [(False, f"preparing its arguments in the parent:\n{traceback.format_exc()}")] * world
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    port, timeout = free_port(), SPAWN_TIMEOUT[world]
    procs = [ctx.Process(target=_rank_main, args=(rank, world, port, cases, messages), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    finished, deadline, why = set(), time.monotonic() + timeout, None
    try:
        while len(finished) < world and why is None:
            try:
                rank, name, ok, payload, seconds = messages.get(timeout=1.0)
                if name is None:
                    finished.add(rank)
                else:
                    outcomes[name][rank] = (ok, torch.load(io.BytesIO(payload), weights_only=False) if ok else payload)
                    if rank == 0:
                        SECONDS[world, name] = seconds
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in finished]
                if dead:
                    why = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
            if why is None and time.monotonic() > deadline:
                why = f"the world-{world} spawn did not finish within {timeout} s (hang?)"
    finally:
        for p in procs:
            p.join(timeout=5 if why is None else 0)
            if p.is_alive():
                p.kill()
    for rank in range(world):  # the cases a dead or hung rank did not finish
        unfinished = [name for name in names if outcomes[name][rank] is None]
        for name in unfinished:
            outcomes[name][rank] = (False, f"not finished: {why}; rank {rank} was running case {unfinished[0]!r}")
    return outcomes


def _rank_main(rank: int, world: int, port: int, cases: list, messages) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    for i, (name, fn, args) in enumerate(cases):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"case{i}", store), rank=rank, world_size=world, timeout=timeout)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            buffer = io.BytesIO()  # tensors travel as bytes: shared-memory handles die with the rank
            torch.save(fn(*args), buffer)
            ok, payload = True, buffer.getvalue()
        except BaseException:  # noqa: BLE001 - reported to the parent, as the case's result
            ok, payload = False, traceback.format_exc()
        finally:
            dist.destroy_process_group()
            torch._dynamo.reset()
        messages.put((rank, name, ok, payload, (time.perf_counter() - wall, time.process_time() - cpu)))
    store.set(f"finished{rank}", "1")
    if rank == 0:  # rank 0 holds the store: it leaves last
        store.wait([f"finished{r}" for r in range(world)])
    messages.put((rank, None, True, None, None))
