"""Shard rules one op at a time: a one-node graph with fake values, placements in, decision out."""

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from para_fx.passes.shard_rules import Group, decide
from para_fx.placement import REPLICATE, Partial, Shard, plain

aten = torch.ops.aten
GROUP = Group(parts=2, rank=1, name="unused")


def one_op(target, *args, **kwargs):
    """The node of ``target(*args, **kwargs)`` in a graph whose tensor args are placeholders."""
    mode = FakeTensorMode()
    graph = fx.Graph()
    fakes = {}

    def as_node(a):
        if not isinstance(a, torch.Tensor):
            return a
        node = graph.placeholder(f"x{len(fakes)}")
        node.meta["val"] = fakes[node] = mode.from_tensor(a)
        return node

    node_args = fx.node.map_aggregate(args, as_node)
    node = graph.call_function(target, node_args, kwargs)
    with mode:
        node.meta["val"] = target(*fx.node.map_aggregate(node_args, lambda a: fakes.get(a, a)), **kwargs)
    return node, list(fakes)


def test_fused_rms_norm_keeps_a_token_split():
    node, (x, w) = one_op(aten._fused_rms_norm.default, torch.randn(2, 9, 8), [8], torch.randn(8), 1e-6)
    layout = ((4, 1), (5, 1))
    d = decide(node, {x: Shard(1, layout), w: REPLICATE}, GROUP)
    assert d.reason is None and d.out == [Shard(1, layout), Shard(1, layout)]
    assert d.inputs == {x: Shard(1, layout), w: REPLICATE}


def test_fused_rms_norm_over_the_sharded_dim_falls_back():
    node, (x, w) = one_op(aten._fused_rms_norm.default, torch.randn(2, 9, 8), [8], torch.randn(8), 1e-6)
    d = decide(node, {x: Shard(2, plain(8)), w: REPLICATE}, GROUP)
    assert d.reason == "normalises over the sharded dim" and d.out == [REPLICATE, REPLICATE]


def test_op_without_a_rule_asks_dtensor_and_keeps_the_layout():
    node, (x,) = one_op(aten.cumsum.default, torch.randn(2, 9, 8), 2)
    layout = ((4, 1), (5, 1))  # a segmented split survives: DTensor only says which dim stays split
    d = decide(node, {x: Shard(1, layout)}, GROUP)
    assert d.reason is None and d.out == Shard(1, layout)


def test_dtensor_partial_sum_becomes_a_partial():
    node, (x,) = one_op(aten.sum.default, torch.randn(9, 8))
    d = decide(node, {x: Shard(0, plain(9))}, GROUP)
    assert d.reason is None and d.out == Partial("sum")


def test_dtensor_redistribution_of_a_sharded_input_is_a_reported_fallback():
    node, (x,) = one_op(aten.cumsum.default, torch.randn(2, 9, 8), 1)  # a scan along the split dim
    d = decide(node, {x: Shard(1, plain(9))}, GROUP)
    assert d.out == REPLICATE and d.inputs == {x: REPLICATE}
    assert d.reason == f"no sharding rule for {aten.cumsum.default}"


def test_replicated_inputs_need_no_rule():
    node, (x,) = one_op(aten.cumsum.default, torch.randn(2, 9, 8), 1)
    d = decide(node, {x: REPLICATE}, GROUP)
    assert d.reason is None and d.out == REPLICATE
