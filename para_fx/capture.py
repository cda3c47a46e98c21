"""Dynamo's torch-IR graph -> a functional aten inference graph the passes can read.

The passes want canonical aten ops (``torch.Tag.pointwise``, one SDPA op that returns its
log-sum-exp), a fake value with a static shape on every node (``meta["val"]``) and the model's
module paths and source lines (``nn_module_stack``, ``stack_trace``) for reports. ``make_fx`` over
an ``Interpreter`` with ``preserve_node_meta`` gives all of that with public APIs that have been
stable across torch releases, and ``functionalize`` removes in-place ops.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx


def capture_aten(gm: fx.GraphModule, example_inputs: Sequence[Any], functional: bool = True) -> fx.GraphModule:
    """Trace ``gm`` to aten with static shapes, keeping node metadata; ``example_inputs`` are concrete.

    Also used after a pass (``functional=False``) to inline the Python helpers a pass inserted
    and to give every new node its fake value.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [_to_fake(fake_mode, x) for x in example_inputs]

    def run(*args):
        return fx.Interpreter(gm).run(*args)

    fn = torch.func.functionalize(run, remove="mutations") if functional else run
    with torch.fx.traceback.preserve_node_meta(), torch.no_grad(), fake_mode:
        traced = make_fx(fn, pre_dispatch=False)(*fake_inputs)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced


def _to_fake(mode: FakeTensorMode, x: Any) -> Any:
    if isinstance(x, FakeTensor):
        x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if isinstance(x, torch.Tensor):
        return mode.from_tensor(x, static_shapes=True)
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return x
