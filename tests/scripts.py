"""The scripts tier's subprocesses (the examples as scripts, the README's code, the demo), run in
the background two at a time from when the tests reach the multi-process tiers.

Each script runs 2 ranks and spends seconds starting Python and torch in each process; run one
after another, they leave cores idle while they start. Started early and at a low priority,
like the spawned ranks of tests/ranks.py, they use what the ranks leave of the cores, and each
test waits for its own script. A script is registered with ``add`` when its test module is
imported and started when tests/conftest.py calls ``start`` with the selected tests' scripts; it
runs in a folder of its own and a session of its own, so that a hang kills every process it
started.

Every Python process of a script (the script, torchrun's workers, the ranks it spawns) is forked
from a server that imported torch, diffusers and para-fx once (tests/zygote.py), one server per
environment and list of imports: each such process had spent about 7 s of CPU importing them.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

import zygote

CONCURRENT = 2  # scripts at a time: each runs 2 ranks on a 2-core machine
NICENESS = 10  # as the spawned ranks': the pytest process keeps its priority
TIMEOUT = 600  # s from a script's start

# Wall seconds each script took, two at a time, in the scripts tier alone on the 2-core machine
# (2026-12-01): the longest start first, so that the last to finish is a short one
SECONDS = {"demo without torchao": 39, "cache": 21, "example plain_dit": 18, "pipeline": 18, "usage": 15, "serve": 12}

# The scripts' environment (the README's examples, the plain DiT's): one thread per rank, and
# Inductor's C++ builds in the rank itself, no pool of compile workers that each start Python and
# torch on the 2 cores the ranks share. One environment for all of them: one server of
# tests/zygote.py, whose imports cost about 9.5 s of CPU (the demo's has its own, see PRELOAD)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}

# What the servers of tests/zygote.py import before they fork a script's processes (statements); a
# script may name its own (the demo: only what it imports, so that what the imports print is what a
# fresh Python running it prints)
PRELOAD = (
    "import torch, torch.distributed.run, torch._dynamo, torch._inductor.compile_fx",
    "import para_fx, para_fx.adapters.diffusers, para_fx.testing.zoo, para_fx.testing.tiny_pipelines, para_fx.testing.launch",
    "from diffusers import FluxPipeline",
)

_COMMANDS: dict[str, tuple[list[str], dict[str, str] | None, tuple[str, ...]]] = {}
_ZYGOTES: dict[tuple, tuple[str, subprocess.Popen]] = {}  # (environment, imports) -> its shim and its server
_RUNS: dict[str, concurrent.futures.Future] = {}
_POOL: concurrent.futures.ThreadPoolExecutor | None = None  # made by the first start: not in the ranks that import test modules
_FOLDERS: tempfile.TemporaryDirectory | None = None
_RUNNING: set[subprocess.Popen] = set()


@dataclasses.dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    folder: pathlib.Path  # the working folder: what the script saved

    def log(self) -> str:
        """The ends of stdout and stderr, for an assertion's message."""
        return self.stdout[-3000:] + self.stderr[-3000:]


def add(name: str, args: list[str], env: dict[str, str] | None = None, preload: tuple[str, ...] = PRELOAD) -> None:
    """Register ``args`` as script ``name`` (``env``: its whole environment; None: this process's;
    ``preload``: what its Python processes have imported when they start, see PRELOAD)."""
    assert name not in _COMMANDS, f"script {name!r} registered twice"
    _COMMANDS[name] = (args, env, tuple(preload))


def start(names) -> None:
    """Start the scripts ``names`` in the background, CONCURRENT at a time (each once), the longest first."""
    global _POOL, _FOLDERS
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(CONCURRENT, thread_name_prefix="scripts")
        _FOLDERS = tempfile.TemporaryDirectory(prefix="para-fx-scripts-")
        atexit.register(_FOLDERS.cleanup)
    for name in sorted(names, key=lambda n: -SECONDS.get(n, 0)):  # stable: the others in the order given
        if name not in _RUNS:
            folder = pathlib.Path(_FOLDERS.name) / name.replace(" ", "_")
            folder.mkdir()
            args, env, preload = _COMMANDS[name]
            if args[0] == sys.executable:
                args = [_zygote(env, preload), *args[1:]]
            _RUNS[name] = _POOL.submit(run, args, env, folder, NICENESS)


def _zygote(env: dict[str, str] | None, preload: tuple[str, ...]) -> str:
    """The shim of the server for this environment and these imports, started now if it was not."""
    env = dict(os.environ if env is None else env)
    key = (tuple(sorted(env.items())), preload)
    if key not in _ZYGOTES:
        folder = pathlib.Path(_FOLDERS.name)
        index = len(_ZYGOTES)
        socket_path, shim = str(folder / f"zygote{index}.sock"), str(folder / f"python{index}")
        zygote.write_shim(shim, socket_path)
        printed = [open(folder / f"zygote{index}.{stream}", "w+b") for stream in ("out", "err")]
        server = subprocess.Popen(
            [sys.executable, zygote.__file__, socket_path, shim, *preload], cwd=folder, env=env,
            stdin=subprocess.DEVNULL, stdout=printed[0], stderr=printed[1], start_new_session=True,
        )
        os.setpriority(os.PRIO_PROCESS, server.pid, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
        for f in printed:
            f.close()
        _ZYGOTES[key] = (shim, server)
    return _ZYGOTES[key][0]


def result(name: str) -> Outcome:
    """Script ``name``'s outcome, once it has finished (started now if it was not)."""
    start([name])
    return _RUNS[name].result()


def stop() -> None:
    """Drop the scripts not started and kill those running, with all they started (an interrupted session)."""
    if _POOL is not None:
        _POOL.shutdown(wait=False, cancel_futures=True)
    for process in list(_RUNNING):
        _kill(process)
    for _, server in _ZYGOTES.values():  # it reaps what it forked first: their CPU time counts in this process's
        server.terminate()
    for _, server in _ZYGOTES.values():
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill(server)
            server.wait()
    _ZYGOTES.clear()


def run(args: list[str], env: dict[str, str] | None, folder: pathlib.Path, niceness: int = 0) -> Outcome:
    """Run ``args`` in ``folder`` and a new session; a run past TIMEOUT is killed with all it started."""
    process = subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _RUNNING.add(process)
    try:
        if niceness:  # now, long before it has imported torch and started its ranks, which inherit it
            os.setpriority(os.PRIO_PROCESS, process.pid, os.getpriority(os.PRIO_PROCESS, 0) + niceness)
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill(process)
            stdout, stderr = process.communicate()
            stderr += f"\n{args[0]} timed out after {TIMEOUT} s and was killed"
    finally:
        _RUNNING.discard(process)
    return Outcome(process.returncode, stdout, stderr, folder)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # it has just ended
        pass
