"""The persistent runner on 2 CPU ranks: results, remote errors, timeouts, a dead rank, clean shutdown."""

import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

import para_fx.runtime.runner
from para_fx.runtime.runner import RankDied, RequestFailed, Runner
import ranks

pytestmark = pytest.mark.ranks  # the runner starts its own 2 ranks


def setup(rank, world_size):
    torch.set_num_threads(1)
    return {"rank": rank, "base": torch.tensor([10.0 * (rank + 1)])}


def handle(state, op, *args):
    """A tiny request language: each op exercises one behaviour of the runner."""
    rank = state["rank"]
    if op == "info":  # world size and a collective over the state every rank built in setup
        total = state["base"].clone()
        dist.all_reduce(total)
        return rank, dist.get_world_size(), total
    if op == "raise_on" and rank == args[0]:
        raise ValueError(f"bad request on rank {rank}")
    if op == "sleep":
        time.sleep(args[0])
    if op == "exit_on" and rank == args[0]:
        os._exit(3)
    if op in ("raise_in_collective", "exit_in_collective"):  # the others wait for it in an all-reduce
        if rank == args[0]:
            if op == "exit_in_collective":
                os._exit(4)
            raise ValueError(f"bad request on rank {rank}")
        dist.all_reduce(torch.ones(1))
    return op, rank


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class ForkedRanks:
    """torch.multiprocessing for the runner, whose "spawn" context is that of tests/ranks.py: ranks
    forked from the server that imported torch and para-fx once. The four starts of this module's
    runner (the first, a respawn, two restarts) started 8 processes that imported them again, about
    4 s of CPU each on the 2-core machine. What the runner does with its processes is the same; its
    own "spawn" start is what examples/serve.py runs (tests/test_readme.py)."""

    def __getattr__(self, name):
        return getattr(torch.multiprocessing, name)

    def get_context(self, method=None):
        assert method == "spawn", method
        return ranks.fork_context()


@pytest.fixture(scope="module")
def runner():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(para_fx.runtime.runner, "mp", ForkedRanks())
        with Runner(setup, handle, world_size=2, timeout=30, setup_timeout=120, backend="gloo") as r:
            yield r


def test_returns_rank_zero_result_and_collective(runner):
    rank, world, total = runner("info")
    assert (rank, world) == (0, 2)
    torch.testing.assert_close(total, torch.tensor([30.0]))
    assert [r[0] for r in runner.submit_all("info")] == [0, 1]


def test_error_on_rank_one_then_next_request_succeeds(runner):
    with pytest.raises(RequestFailed, match="rank 1 raised") as info:
        runner("raise_on", 1)
    assert info.value.rank == 1
    assert "ValueError: bad request on rank 1" in info.value.remote_traceback
    assert 'in handle' in info.value.remote_traceback
    assert runner("info")[2].item() == 30.0


def test_timeout_then_next_request_gets_its_own_answer(runner):
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] within 0.5s"):
        runner.request(("sleep", 2.0), timeout=0.5)
    # The late answer to the timed-out request is dropped, not mistaken for this one's.
    assert runner.request(("echo",), timeout=30) == ("echo", 0)


def test_error_while_the_others_wait_in_a_collective_respawns_and_keeps_serving(runner):
    before = runner.pids
    started = time.monotonic()
    with pytest.raises(RequestFailed) as info:
        runner("raise_in_collective", 1)
    message = str(info.value)
    assert message.startswith("rank 1 raised:\nTraceback") and "ValueError: bad request on rank 1" in message
    assert "ranks [0] did not finish the request" in message and "respawned" in message
    assert time.monotonic() - started < 30
    assert not any(alive(p) for p in before)
    assert runner("info")[2].item() == 30.0  # serving again, with a fresh process group


def test_a_rank_killed_inside_a_collective_is_noticed_within_seconds(runner):
    started = time.monotonic()
    with pytest.raises(RankDied, match=r"rank 1 died \(exit code 4\)"):
        runner("exit_in_collective", 1)
    assert time.monotonic() - started < 3
    runner.restart()
    assert runner("info")[1] == 2


def test_dead_rank_requires_restart_and_close_leaves_no_process(runner):
    """Runs last: it ends by closing the shared runner."""
    before = runner.pids
    with pytest.raises(RankDied, match=r"rank 1 died \(exit code 3\)"):
        runner("exit_on", 1)
    with pytest.raises(RankDied, match="restart"):
        runner("info")
    assert not any(alive(p) for p in before)  # the surviving rank was stopped too
    runner.restart()
    assert runner("info")[1] == 2
    pids = runner.pids
    assert all(alive(p) for p in pids)
    runner.close()
    runner.close()  # idempotent
    assert not any(alive(p) for p in pids)
    # none of its ranks left unreaped (other tests' rank spawns may still be running beside it)
    assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
