"""Quiet runs: para-fx's own code warns about nothing, and never imports torchao unless weights are torchao's."""

import os
import re
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.fx.experimental.proxy_tensor import make_fx

from para_fx.runtime import collectives
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A Python warning attributed to a file of this repository: "/.../para_fx/runtime/cache.py:131: UserWarning: ..."
OWN_WARNING = re.compile(r"/(para_fx|passes|adapters|examples)/[\w/]+\.py:\d+: \w*Warning")


def test_gather_warns_nothing_eagerly_or_traced():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        group = dist.group.WORLD.group_name
        gather = lambda x: collectives.gather(x, 0, ((5, 1),), 2, group)  # 5 rows, 3 of them on rank 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert gather(torch.randn(3, 4)).shape == (5, 4)
            graph = make_fx(gather)(torch.randn(3, 4))
    finally:
        dist.destroy_process_group()
    ops = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert "_c10d_functional.all_gather_into_tensor.default" in ops
    assert "_c10d_functional.wait_tensor.default" in ops


# That the backend, the cache and explain import no torchao is checked in the fresh process of
# tests/test_backend.py's entry-point test (one start of Python and torch for both checks).


# The demo with torchao hidden (tests/without_torchao/sitecustomize.py), every warning shown.
DEMO_ENV = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests", "without_torchao"), "PYTHONWARNINGS": "always"}
# Its processes are forked from a Python that imported what the demo imports (tests/zygote.py),
# with torchao hidden and every warning shown as here; what those imports printed, each process prints again.
DEMO_IMPORTS = ("import argparse, torch, torch.distributed, para_fx, para_fx.testing.zoo, para_fx.testing.launch",)
scripts.add("demo without torchao", [sys.executable, os.path.join(ROOT, "examples", "demo.py")], DEMO_ENV, DEMO_IMPORTS)


@pytest.mark.scripts("demo without torchao")
def test_demo_without_torchao_prints_no_warning():
    """No warning in the parent or in the ranks it spawns, torchao hidden (diffusers imports it whenever it is installed)."""
    result = scripts.result("demo without torchao")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith("MATCH"), result.stdout[-3000:]
    assert not OWN_WARNING.search(result.stderr), result.stderr[-3000:]
    for noise in ("torchao", "_pytree", "Warning"):
        assert noise not in result.stderr, result.stderr[-3000:]
