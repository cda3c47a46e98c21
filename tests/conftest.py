import gc
import os
import sys

# Inductor's CPU kernels without SIMD, in this process, the ranks and the scripts (set before torch
# reads it): the tests check para's graphs, not Inductor's vectorisation, and g++ builds the scalar
# kernels in about two thirds of the CPU time (the two Inductor attention cases on 2 ranks: 27 s
# against 43 s). TORCHINDUCTOR_VEC_ISA_OK=1 in the environment keeps SIMD.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
# glibc's malloc keeping what it frees, in the processes started from here (the ranks' fork server,
# the scripts); .ci/run sets it for this one too: each page a heap gave back was faulted in again
# when the next case allocated the same sizes (2 ranks' cases: about 5% less CPU)
os.environ.setdefault(
    "GLIBC_TUNABLES",
    "glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=268435456:glibc.malloc.top_pad=67108864",
)

import pytest  # noqa: E402
import torch  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)  # tests import the shared rank spawns (tests/ranks.py)
sys.path.insert(0, os.path.dirname(TESTS))  # and the examples (examples.digits) from the repository root

# Tiers, in the order they run: one process (the rules and the golden graphs first, then structure
# on simulated meshes, single-device numbers, the CLI), then the numeric tier on spawned gloo ranks
# (marked "ranks"), then the examples, the README's code and the demo on 2 ranks (marked
# "scripts(name)", run as subprocesses in the background from the start of the numeric tier).
LATER_TIERS = ("ranks", "scripts")
FIRST_FILES = ("test_rules.py", "test_inspect.py")

# The spawned ranks run beside the first tier (pytest_collection_finish): one thread here, so that
# OpenMP does not spin on a core that a rank holds.
torch.set_num_threads(1)
# Every full collection scans what torch, diffusers and the compiled tests keep alive (about half a
# million objects, 0.4 s each time): all generations are collected a tenth as often as Python's
# default (700, 10, 10) would, as on the ranks (tests/ranks.py).
gc.set_threshold(700, 10, 100)


@pytest.fixture
def fresh_dynamo():
    """A test that compiles code other tests compile too (the same DiT with another attention, the
    examples run in this process) starts and leaves Dynamo empty: its recompile limit would
    otherwise be reached, here or in a later test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(items):
    """The fast tier first, the rules and goldens at its head, so that a broken rule fails in seconds."""

    def order(item):
        tier = next((i + 1 for i, name in enumerate(LATER_TIERS) if item.get_closest_marker(name)), 0)
        first = FIRST_FILES.index(item.path.name) if item.path.name in FIRST_FILES else len(FIRST_FILES)
        return tier, first

    items.sort(key=order)  # stable: file order otherwise


# The scripts of the selected tests (the argument of their "scripts" marker), started in the
# background at the first test of the later tiers (tests/scripts.py).
SCRIPTS_TO_START: list[str] = []


def pytest_collection_finish(session):
    """Start the ranks of every world size now, at a low priority: they run on what the first tier leaves idle."""
    if session.config.option.collectonly:
        return
    # what the imports and the collection made (torch, diffusers, the test modules): never garbage,
    # and left out of every later full collection (each scanned about half a million objects, as on
    # the ranks; test_shard.py and test_cache.py in-process: 17 full collections, 7.5 s)
    gc.collect()
    gc.freeze()
    if any(item.get_closest_marker("ranks") for item in session.items):
        import ranks

        ranks.start_all()
    markers = (item.get_closest_marker("scripts") for item in session.items)
    SCRIPTS_TO_START[:] = [marker.args[0] for marker in markers if marker is not None]


def pytest_runtest_setup(item):
    """At the first test of the later tiers, the scripts start beside the ranks: the first tier keeps its speed."""
    if SCRIPTS_TO_START and any(item.get_closest_marker(tier) for tier in LATER_TIERS):
        import scripts

        scripts.start(SCRIPTS_TO_START)
        SCRIPTS_TO_START.clear()


def pytest_sessionfinish(session):
    """The scripts still running when the session ends (interrupted) are killed, not waited for; the
    ranks' fork server is stopped."""
    import scripts

    scripts.stop()
    ranks = sys.modules.get("ranks")
    if ranks is not None:
        ranks.stop()
    # pytest's unraisable-exception check collects all generations five times after this hook, each
    # a scan of everything the session left alive: one collection here (its garbage's exceptions
    # are still reported), and what survives it is frozen out of those five scans (after
    # test_traceable.py and test_backend.py: 1.6 s of collections at the end -> 0.6 s)
    gc.collect()
    gc.freeze()


def pytest_terminal_summary(terminalreporter):
    """The spawns' slowest cases: --durations charges a whole spawn to the test that started it."""
    ranks = sys.modules.get("ranks")  # imported by the numeric tier's tests only
    if ranks is not None and ranks.SECONDS:
        terminalreporter.section("most CPU-costly cases on spawned ranks (rank 0: wall, CPU)")
        for world in sorted({world for world, _ in ranks.SECONDS}):
            times = [seconds for (w, _), seconds in ranks.SECONDS.items() if w == world]
            wall, cpu = sum(t[0] for t in times), sum(t[1] for t in times)
            terminalreporter.write_line(f"{wall:7.2f}s {cpu:7.2f}s  world {world}: {len(times)} cases")
        # by CPU: a case's wall time on the niced ranks is mostly waiting for a core
        slowest = sorted(ranks.SECONDS.items(), key=lambda item: -item[1][1])[:25]
        for (world, name), (wall, cpu) in slowest:
            terminalreporter.write_line(f"{wall:7.2f}s {cpu:7.2f}s  world {world}  {name}")
