"""A persistent group of ranks for serving: set up once, then answer requests.

``Runner(setup, handle, world_size)`` spawns ``world_size`` processes, each in one process group
(NCCL with one GPU per rank when CUDA is available, gloo otherwise). Every rank builds its
state once with ``setup(rank, world_size)`` (load and compile a pipeline, say); then every request
goes to all ranks, which run ``handle(state, *args, **kwargs)`` together (SPMD), and rank 0's
result comes back. A request never hangs the caller: an exception on a rank is raised here as
``RequestFailed`` with that rank's traceback first; a request that outlives its timeout raises
``TimeoutError``; a rank process that dies is noticed within a second (``RankDied``). The runner
keeps serving after a failed or timed-out request. When a rank raised while the others wait in a
collective it will never join, they cannot be freed: after a grace of a few seconds the runner
kills and respawns every rank (``setup`` runs again) before raising the error. Only a dead rank
requires ``restart()``.

``setup`` and ``handle`` must be importable by name (module-level functions): ranks are spawned.
Results travel through a pipe; CUDA tensors in them are moved to the CPU first.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import socket
import time
import traceback
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


_SETUP = -1  # the request id of the setup step's replies
_POLL_S = 0.5  # how often a waiting caller checks that every rank is alive
_STUCK_GRACE_S = 3.0  # after a rank failed, how long the others may take to answer before they are respawned
_CLOSE_GRACE_S = 10.0  # how long ranks may take to exit when asked, before they are killed


class RankFailed(RuntimeError):
    """A rank raised; the message holds its traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RequestFailed(RankFailed):
    """``handle`` (or ``setup``) raised on a rank; ``rank`` and ``remote_traceback`` say where and how."""

    def __init__(self, rank: int, remote_traceback: str, others: list[int], respawned: str = ""):
        also = f" (ranks {others} failed too)" if others else ""
        super().__init__(f"rank {rank} raised{also}:\n{remote_traceback}{respawned}")
        self.rank = rank
        self.remote_traceback = remote_traceback


class RankDied(RuntimeError):
    """A rank process exited; the runner cannot serve until ``restart()``."""


class Runner:
    """``world_size`` ranks that set up once and then serve every request together.

    ``timeout``: seconds a request may take (``request(..., timeout=)`` overrides it);
    ``setup_timeout``: seconds ``setup`` may take; ``backend``: "nccl" (the default with CUDA: rank
    r uses GPU r) or "gloo" (the default without). Use as a context manager, or call ``close()``;
    a runner still open at interpreter exit is closed then.
    """

    def __init__(
        self,
        setup: Callable[[int, int], Any],
        handle: Callable[..., Any],
        world_size: int,
        *,
        timeout: float = 600.0,
        setup_timeout: float = 1800.0,
        backend: str | None = None,
    ):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Runner: world_size must be a positive int, got {world_size!r}")
        self.setup, self.handle, self.world_size = setup, handle, world_size
        self.timeout, self.setup_timeout = timeout, setup_timeout
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if backend is None and 0 < gpus < world_size:
            raise ValueError(
                f"Runner: {world_size} ranks but {gpus} GPUs (one GPU per rank); pass backend='gloo' to run on the CPU"
            )
        self.backend = backend or ("nccl" if gpus else "gloo")
        self._ids = itertools.count()
        self._procs: list[mp.Process] = []
        self._broken: str | None = None
        self.start()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the ranks and wait until every ``setup`` has returned."""
        if self._procs:
            raise RuntimeError("Runner.start: already running; call restart() to start afresh")
        ctx = mp.get_context("spawn")
        self._requests = [ctx.Queue() for _ in range(self.world_size)]
        self._replies = ctx.Queue()
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(self.setup, self.handle, rank, self.world_size, port, self.backend, self._requests[rank], self._replies),
                name=f"para_fx-rank{rank}",
            )
            for rank in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        atexit.register(self.close)
        self._broken = None
        try:
            self._collect(_SETUP, self.setup_timeout, "setup")
        except BaseException:
            self.close()
            raise

    def close(self, grace: float = _CLOSE_GRACE_S) -> None:
        """Stop every rank (asking first, killing after ``grace`` seconds) and reap the processes."""
        atexit.unregister(self.close)
        if not self._procs:
            return
        for q in self._requests:
            try:
                q.put(None)
            except (ValueError, OSError):  # queue already closed
                pass
        deadline = time.monotonic() + grace
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=_CLOSE_GRACE_S)
        for q in [*self._requests, self._replies]:
            q.close()
            q.cancel_join_thread()
        self._procs = []

    def restart(self) -> None:
        """Close and start again (``setup`` runs again): the way back after a rank died."""
        self.close()
        self.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------

    def request(
        self, args: tuple = (), kwargs: dict | None = None, *, timeout: float | None = None, all_ranks: bool = False
    ) -> Any:
        """Run ``handle(state, *args, **kwargs)`` on every rank; rank 0's result, or the list of all."""
        if self._broken:
            raise RankDied(f"para_fx runner: {self._broken}; call restart()")
        if not self._procs:
            raise RuntimeError("para_fx runner: closed; call start()")
        request_id = next(self._ids)
        # Pickled here, once per rank (a tensor's shared memory handle can be opened only once), so
        # that an argument that cannot be pickled raises in the caller rather than in a queue thread.
        messages = [bytes(ForkingPickler.dumps((request_id, args, kwargs or {}, all_ranks))) for _ in self._requests]
        for q, message in zip(self._requests, messages):
            q.put(message)
        results = self._collect(request_id, self.timeout if timeout is None else timeout, "request")
        return results if all_ranks else results[0]

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """``handle(state, *args, **kwargs)`` on every rank; rank 0's result."""
        return self.request(args, kwargs)

    __call__ = submit

    def submit_all(self, *args: Any, **kwargs: Any) -> list[Any]:
        """``handle(state, *args, **kwargs)`` on every rank; every rank's result, by rank."""
        return self.request(args, kwargs, all_ranks=True)

    def _collect(self, request_id: int, timeout: float, what: str) -> list[Any]:
        """Every rank's reply to ``request_id``; replies to earlier (timed-out) requests are dropped."""
        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        while len(results) + len(failures) < self.world_size:
            self._check_alive({**results, **failures})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply_id, rank, ok, payload = self._replies.get(timeout=min(remaining, _POLL_S))
            except queue.Empty:
                continue
            if reply_id != request_id:
                continue
            if ok:
                results[rank] = ForkingPickler.loads(payload)
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + _STUCK_GRACE_S)
        missing = sorted(set(range(self.world_size)) - set(results) - set(failures))
        if failures:
            first = min(failures)
            if not missing:
                raise RequestFailed(first, failures[first], sorted(failures)[1:])
            # they wait in a collective the failed rank never joins, and a later request would pair with it
            note = (
                f"\n(ranks {missing} did not finish the {what} within {_STUCK_GRACE_S:g}s of rank {first}'s error, "
                "stuck in a collective: every rank was respawned and setup ran again)"
            )
            error = RequestFailed(first, failures[first], sorted(failures)[1:], note)
            self._respawn(error)
            raise error
        if missing:
            raise TimeoutError(
                f"para_fx runner: the {what} got no answer from ranks {missing} within {timeout:g}s; they may "
                "still be running it (later requests wait behind it): call restart() if they hang"
            )
        return [results[r] for r in range(self.world_size)]

    def _check_alive(self, answered: dict[int, Any]) -> None:
        """Raise ``RankDied`` for a rank that exited before answering (the others are killed at once:
        they may wait in a collective for it)."""
        dead = [(rank, p.exitcode) for rank, p in enumerate(self._procs) if rank not in answered and not p.is_alive()]
        if dead:
            self._broken = ", ".join(f"rank {rank} died (exit code {code})" for rank, code in dead)
            self.close(grace=0.0)
            raise RankDied(f"para_fx runner: {self._broken}; the runner must be restarted (restart())")

    def _respawn(self, cause: BaseException) -> None:
        """Kill every rank and start afresh; a runner that cannot start again is left broken."""
        self.close(grace=0.0)
        try:
            self.start()
        except BaseException as error:
            self._broken = f"respawning the ranks after a failed request failed: {error}"
            raise RankDied(f"para_fx runner: {self._broken}; call restart()") from cause


def _serve(setup, handle, rank, world_size, port, backend, requests, replies) -> None:
    """A rank's life: join the group, build the state, answer requests until told to stop."""
    parent = os.getppid()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        try:
            state = setup(rank, world_size)
            replies.put((_SETUP, rank, True, bytes(ForkingPickler.dumps(None))))
        except BaseException:
            replies.put((_SETUP, rank, False, traceback.format_exc()))
            return
        while True:
            try:
                message = requests.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the caller is gone: do not linger as an orphan
                    return
                continue
            if message is None:
                return
            request_id, args, kwargs, all_ranks = ForkingPickler.loads(message)
            try:
                out = handle(state, *args, **kwargs)
                out = _to_cpu(out) if rank == 0 or all_ranks else None
                replies.put((request_id, rank, True, bytes(ForkingPickler.dumps(out))))
            except BaseException:
                replies.put((request_id, rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _to_cpu(value: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda x: x.cpu() if isinstance(x, torch.Tensor) and x.device.type != "cpu" else x, value
    )
