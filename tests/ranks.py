"""The multi-process numeric tier: one spawn of N gloo ranks per world size runs every case
registered for that size, and each test asserts on its own case.

Starting ranks costs seconds of imports (torch, diffusers, Dynamo) per process: the ranks are
forked from one server that imported them once (``fork_context``), one spawn per world size, and the
3-rank cases, about a second of work, run on the first 3 ranks of the 4-rank spawn (``HOSTED``)
rather than pay for a spawn of their own. A case is a module-level
function (the ranks import it by name) registered with ``add(world, name, fn, *args)`` when its
test module is imported. On every rank of its world each case runs in a process group of its own
(a case that raises halfway leaves nothing for the next one to trip on), and its result, or its
traceback, is sent to the parent as soon as it finishes. So a case that fails fails its own test
only; a rank that dies or hangs fails the cases it did not finish, with the reason, and the spawn
is killed ``SPAWN_TIMEOUT`` seconds after the tests start waiting for it: nothing hangs.

tests/conftest.py starts every spawn as soon as the tests are collected, at a low priority: the
ranks use what the first (one-process) tier leaves of the cores, and that tier runs as fast as on
an idle machine. The cases prepared in the parent are made and sent to every spawn, smallest world
first, when the tests first wait for a result: no spawn idles while the parent waits for another.

    python -m pytest -q -m ranks tests      # this tier alone
"""

from __future__ import annotations

import datetime
import gc
import io
import multiprocessing.forkserver
import os
import queue
import time
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from para_fx.runtime.runner import free_port

COLLECTIVE_TIMEOUT = 300  # s: a rank waiting longer in one collective raises (a case bug, not a slow CPU)
SPAWN_TIMEOUT = {2: 1500, 3: 300, 4: 1500}  # s from the first wait for a spawn to its end, on a busy 2-core machine
HOSTED = {3: 4}  # world size of the cases -> the larger spawn whose first ranks run them, the others idle
RANK_NICENESS = 10  # the ranks yield the cores to the pytest process and to what it runs in the foreground
ORPHAN_TIMEOUT = 3600  # s a rank waits for the prepared cases: a rank whose parent died gives up
# A full collection scans every object that torch, diffusers and the compiled cases left (about half
# a million, 0.3 s each time): a rank freezes what survives each case's collection, and collects
# all generations a tenth as often as Python's default (700, 10, 10) would.
GC_THRESHOLDS = (700, 10, 100)

# Imported once, by the ranks' fork server, before the test modules (which import some of them only
# inside their functions): para-fx, Inductor, and the diffusers models and VAEs (with torchao, which
# diffusers imports whenever it is installed), about 3 s of CPU a rank beside torch's and para-fx's
HEAVY_MODULES = ("para_fx", "torch._inductor.compile_fx", "diffusers.models.transformers", "diffusers.models.autoencoders")


def skip_guard_latency_profile() -> None:
    """Dynamo times every new guard set once, for a log line and a compile metric, after flushing
    the CPU's caches through a large buffer: about 18 ms of CPU a compile (tiny FLUX, with the malloc
    settings of .ci/run; most of it the kernel's, faulting the buffer in). Nothing here reads that
    metric: the pytest process (every test module imports this one) and the ranks (forked from a
    server that imported it) skip it. The guards themselves are built and checked as before."""
    import torch._dynamo.guards as guards

    if hasattr(guards, "profile_guard_manager"):
        guards.profile_guard_manager = lambda *args, **kwargs: 0.0


skip_guard_latency_profile()


def skip_funcname_lookup() -> None:
    """Dynamo names the function of every source line it records a call from, for a debug log line
    built whether or not that log is on: the first time in a process it reads a file, it tokenizes the
    whole file (diffusers' attention_processor.py, torch.nn.functional: about 1.5 s of CPU for the six
    diffusers models in a fresh process). Nothing here logs it: the pytest process and the ranks skip
    the lookup, and the line goes without the function's name."""
    import torch._dynamo.symbolic_convert as symbolic_convert

    if hasattr(symbolic_convert, "get_funcname"):
        symbolic_convert.get_funcname = lambda filename, lineno: None


skip_funcname_lookup()

_CASES: dict[int, dict[str, tuple]] = {}
_SPAWNS: dict[int, "Spawn"] = {}
_PRELOADED: list[bool] = []  # the fork server's modules are set once, before it starts
_EARLY: set[tuple[int, str]] = set()  # (world, case): run first in their spawn (``add(early=True)``)
SECONDS: dict[tuple[int, str], tuple[float, float]] = {}  # (world, case) -> rank 0's wall and CPU seconds


def spawn_world(world: int) -> int:
    """The world size of the spawn that runs the cases of ``world`` ranks."""
    host = HOSTED.get(world)
    return host if host in _CASES else world


def add(
    world: int, name: str, fn: Callable, *args: Any, prepared: Callable[[], Any] | None = None, early: bool = False
) -> None:
    """Register ``fn(*args)`` to run on ``world`` ranks, each in a process group of that size.

    ``prepared``: a function the parent calls when the case's result is first asked for, whose
    value is passed as the last argument: what is costly to make (single-process references) is
    made once, in the parent, and not while the in-process tier runs. Such cases run last.
    ``early``: the case runs before the others of its spawn; for a case that mostly waits (a rank
    that never arrives, a timeout), while the first tier and the other spawns still have work for
    the cores its ranks leave idle (later, the others wait for the prepared cases and the core idles).
    """
    cases = _CASES.setdefault(world, {})
    assert name not in cases, f"case {name!r} registered twice at world {world}"
    cases[name] = (fn, args, prepared)
    if early:
        _EARLY.add((world, name))


def mesh_id(value: Any) -> str:
    """A mesh shape as "1x2x1", for case names and test ids; other parameters as they print."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def start(world: int) -> None:
    """Start the spawn of the world-``world`` cases on those that need nothing prepared (idempotent)."""
    if world in _CASES and spawn_world(world) not in _SPAWNS:
        _SPAWNS[spawn_world(world)] = Spawn(spawn_world(world))


def start_all() -> None:
    """Start the ranks of every world size that has cases."""
    for world in sorted(_CASES):
        start(world)


def fork_context():
    """The ranks of every spawn are forked from one server process that has imported, once, this
    module, HEAVY_MODULES and the modules of every registered case (torch, Dynamo, diffusers,
    para-fx, the test modules): a rank starts with them imported, where a spawned rank spent about
    7 s of CPU importing them again on the 2-core machine. The server has run no torch operation:
    no thread of OpenMP or of a process group is forked with it."""
    ctx = mp.get_context("forkserver")
    if not _PRELOADED:
        modules = {fn.__module__ for cases in _CASES.values() for fn, _, _ in cases.values()}
        ctx.set_forkserver_preload([__name__, *HEAVY_MODULES, *sorted(modules)])
        # Python 3.11's fork server does not take this process's sys.path: the tests' folder and
        # the repository root (tests/conftest.py) reach it through PYTHONPATH, while it starts
        here = os.path.dirname(os.path.abspath(__file__))
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), *filter(None, [saved])])
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        _PRELOADED.append(True)
    return ctx


def stop() -> None:
    """Stop the fork server once the spawns have ended: reaped here, its ranks' CPU time counts in
    this process's children (as ``time`` reports it), as spawned ranks' did. A spawn no test waited
    for (``-k`` selected none of its cases) is killed first: its ranks would wait ``ORPHAN_TIMEOUT``
    for the prepared cases, and the fork server for them."""
    for spawn in _SPAWNS.values():
        if not spawn.done:
            for p in spawn.procs:
                p.kill()
    if _PRELOADED:
        multiprocessing.forkserver._forkserver._stop()


def result(world: int, name: str) -> list:
    """Every rank's return value of case ``name``; fails the calling test if a rank did not return one."""
    start(world)
    for spawn in sorted(_SPAWNS.values(), key=lambda s: s.world):  # the others run while this one is awaited
        spawn.send_prepared()
    outcomes = _SPAWNS[spawn_world(world)].outcomes()[world, name]
    failed = [f"rank {rank}: {text}" for rank, (ok, text) in enumerate(outcomes) if not ok]
    if failed:  # every failing rank: the one that raised first may not be the first rank
        pytest.fail(f"case {name!r} at world {world}\n" + "\n".join(failed), pytrace=False)
    return [value for _, value in outcomes]


class Spawn:
    """The ranks of one world size: started with the ready cases, sent the prepared ones later.
    A case is keyed by its world size and name: the spawn also runs the cases of the sizes it hosts."""

    def __init__(self, world: int):
        self.world = world
        self.cases = {
            (case_world, name): case
            for case_world, cases in _CASES.items() if spawn_world(case_world) == world
            for name, case in cases.items()
        }
        self.results: dict[tuple[int, str], list] = {key: [None] * key[0] for key in self.cases}
        self.sent = self.done = False
        ready = [(key, fn, args) for key, (fn, args, prepared) in self.cases.items() if prepared is None]
        ready.sort(key=lambda case: case[0] not in _EARLY)  # stable: registration order otherwise
        ctx = fork_context()
        self.messages, self.inboxes = ctx.Queue(), [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_rank_main, args=(rank, world, port, ready, self.inboxes[rank], self.messages), daemon=True)
            for rank in range(world)
        ]
        for p in self.procs:
            p.start()

    def outcomes(self) -> dict[tuple[int, str], list]:
        """Per case, per rank, (True, value) or (False, why); waits for the whole spawn the first time."""
        if not self.done:
            self.done = True
            self.send_prepared()
            self._collect()
        return self.results

    def send_prepared(self) -> None:
        """Make the prepared cases' arguments here and send them to the ranks (once)."""
        if self.sent:
            return
        self.sent = True
        cases = []
        for key, (fn, args, prepared) in self.cases.items():
            if prepared is not None:
                try:
                    cases.append((key, fn, (*args, prepared())))
                except Exception:  # noqa: BLE001 - this case fails, the others run
                    self.results[key] = [(False, f"preparing its arguments in the parent:\n{traceback.format_exc()}")] * key[0]
        for inbox in self.inboxes:
            inbox.put(cases)

    def _collect(self) -> None:
        finished, why, deadline = set(), None, time.monotonic() + SPAWN_TIMEOUT[self.world]
        try:
            while len(finished) < self.world and why is None:
                try:
                    rank, key, ok, payload, seconds = self.messages.get(timeout=1.0)
                    if key is None:
                        finished.add(rank)
                    else:
                        self.results[key][rank] = (ok, torch.load(io.BytesIO(payload), weights_only=False) if ok else payload)
                        if rank == 0:
                            SECONDS[key] = seconds
                except queue.Empty:
                    dead = [r for r, p in enumerate(self.procs) if p.exitcode not in (None, 0) and r not in finished]
                    if dead:
                        why = f"rank {dead[0]} died with exit code {self.procs[dead[0]].exitcode}"
                if why is None and time.monotonic() > deadline:
                    why = f"the world-{self.world} spawn did not finish {SPAWN_TIMEOUT[self.world]} s after the tests began to wait for it (hang?)"
        finally:
            for p in self.procs:
                p.join(timeout=5 if why is None else 0)
                if p.is_alive():
                    p.kill()
        for rank in range(self.world):  # the cases a dead or hung rank did not finish
            unfinished = [key for key in self.cases if rank < key[0] and self.results[key][rank] is None]
            for key in unfinished:
                self.results[key][rank] = (False, f"not finished: {why}; rank {rank} was running case {unfinished[0][1]!r}")


def _rank_main(rank: int, world: int, port: int, ready: list, inbox, messages) -> None:
    os.nice(RANK_NICENESS)
    torch.set_num_threads(1)
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()  # what the imports made (torch, diffusers, the test modules): never garbage, never scanned again
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    for i, ((case_world, name), fn, args) in enumerate(_cases(ready, inbox)):
        if rank >= case_world:  # a case of fewer ranks (HOSTED): this rank waits for the next one
            continue
        dist.init_process_group(
            "gloo", store=dist.PrefixStore(f"case{i}", store), rank=rank, world_size=case_world, timeout=timeout
        )
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
            gc.collect()  # the case's meshes and their groups: each group's transport threads poll until freed
            gc.freeze()  # what survived (modules the case imported, caches): the next collection skips it
        messages.put((rank, (case_world, name), ok, payload, (time.perf_counter() - wall, time.process_time() - cpu)))
    store.set(f"finished{rank}", "1")
    if rank == 0:  # rank 0 holds the store: it leaves last
        store.wait([f"finished{r}" for r in range(world)])
    messages.put((rank, None, True, None, None))


def _cases(ready: list, inbox):
    yield from ready
    yield from inbox.get(timeout=ORPHAN_TIMEOUT)  # the prepared cases, sent when the parent needs them
