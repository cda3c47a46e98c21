"""Run a function on N local ranks (gloo on 127.0.0.1) and collect what each returns.

Used by the tests to check multi-rank semantics on a CPU machine. A rank that raises makes the
whole call raise with that rank's traceback; a rank that hangs makes it raise after ``timeout``
seconds, with every process killed, so a test fails instead of blocking.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..runtime.runner import RankFailed, free_port


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``[fn(*args) on rank 0, ..., on rank world_size-1]``, each inside an initialised gloo group.

    ``fn`` must be importable by name (a module-level function), as the ranks are spawned.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, args, results, timeout), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(outputs) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s (hang?)")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in outputs]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if not ok:
                raise RankFailed(f"rank {rank} raised:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [outputs[r] for r in range(world_size)]


def _rank_main(fn, rank, world_size, port, args, results, timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
        )
        try:
            out = fn(*args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()  # tensors travel as bytes: shared-memory handles die with the rank
        torch.save(out, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        results.put((rank, False, traceback.format_exc()))
