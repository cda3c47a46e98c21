"""Shard rules one op at a time: a one-node graph with fake values, placements in, decision out."""

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from para_fx.passes.localize import localize, partial_mean
from para_fx.passes.shard_rules import Group, decide
from para_fx.core.placement import (
    REPLICATE, Partial, Shard, factor_layout, global_size, in_units, local_ranges, local_size, normalize, plain, repeat,
    same_split, scale_units,
)
from para_fx.runtime.halo import halo_convolution, with_borders

aten = torch.ops.aten
GROUP = Group(parts=2, rank=1, name="unused")


def one_op(target, *args, **kwargs):
    """The node of ``target(*args, **kwargs)`` in a graph whose tensor args are placeholders."""
    mode = FakeTensorMode()
    graph = fx.Graph()
    fakes = {}

    def as_node(a):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [as_node(t) for t in a]
        if not isinstance(a, torch.Tensor):
            return a
        node = graph.placeholder(f"x{len(fakes)}")
        node.meta["val"] = fakes[node] = mode.from_tensor(a)
        return node

    node_args = tuple(as_node(a) for a in args)
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


# --- table-driven: one row per (op call, input placements) -> expected output placement ---------

SEG = ((3, 1), (4, 1))  # cat([text of 3, image of 4]) split over 2 ranks, segment by segment
T = torch.randn  # a tensor argument of this shape
ROWS = [
    # (id, op, args, placements of the tensor args in order, expected output placement)
    ("add broadcast", aten.add.Tensor, (T(2, 7, 8), T(8)), [Shard(1, SEG), REPLICATE], Shard(1, SEG)),
    ("mul spans", aten.mul.Tensor, (T(2, 7, 8), T(1, 7, 8)), [Shard(1, SEG), REPLICATE], Shard(1, SEG)),
    ("view flattens batch", aten.view.default, (T(2, 7, 8), [14, 8]), [Shard(1, SEG)], Shard(0, SEG * 2)),
    ("view splits heads", aten.view.default, (T(2, 7, 8), [2, 7, 2, 4]), [Shard(1, SEG)], Shard(1, SEG)),
    ("view merges the split", aten.view.default, (T(2, 7, 8), [2, 56]), [Shard(1, plain(7))], Shard(1, ((7, 8),))),
    ("view cuts tokens", aten.view.default, (T(2, 6, 8), [2, 3, 16]), [Shard(1, plain(6))], REPLICATE),
    ("view regroups halves", aten.view.default, (T(2, 6, 8), [2, 4, 12]), [Shard(1, plain(6))], Shard(1, plain(4))),
    # tokens into (rows, columns): whole rows for 2 ranks when they split 4 rows evenly, not 3
    ("tokens into rows", aten.view.default, (T(2, 16, 8), [2, 4, 4, 8]), [Shard(1, plain(16))], Shard(1, plain(4))),
    ("tokens cut rows", aten.view.default, (T(2, 12, 8), [2, 3, 4, 8]), [Shard(1, plain(12))], REPLICATE),
    ("permute", aten.permute.default, (T(2, 7, 8), [2, 0, 1]), [Shard(1, SEG)], Shard(2, SEG)),
    ("transpose", aten.transpose.int, (T(2, 7, 8), 1, 2), [Shard(1, SEG)], Shard(2, SEG)),
    ("complex RoPE pairs", aten.view_as_complex.default, (T(2, 7, 4, 2),), [Shard(1, SEG)], Shard(1, SEG)),
    ("complex pairs split", aten.view_as_complex.default, (T(2, 7, 2),), [Shard(2, plain(2))], REPLICATE),
    ("complex to real", aten.view_as_real.default, (torch.randn(2, 7, 4, dtype=torch.complex64),), [Shard(1, SEG)],
     Shard(1, SEG)),
    ("complex multiply", aten.mul.Tensor, (T(2, 7, 4, dtype=torch.complex64), T(7, 4, dtype=torch.complex64)),
     [Shard(1, SEG), Shard(0, SEG)], Shard(1, SEG)),
    ("rows unflatten to samples", aten.view.default, (T(14, 8), [2, 7, 8]), [Shard(0, plain(7) * 2)], Shard(1, plain(7))),
    ("rows split plainly are the batch halves", aten.view.default, (T(14, 8), [2, 7, 8]), [Shard(0, plain(14))],
     Shard(0, plain(2))),
    ("rows split plainly cut samples", aten.view.default, (T(21, 8), [3, 7, 8]), [Shard(0, plain(21))], REPLICATE),
    ("unsqueeze before", aten.unsqueeze.default, (T(2, 7, 8), 0), [Shard(1, SEG)], Shard(2, SEG)),
    ("slice a segment", aten.slice.Tensor, (T(2, 7, 8), 1, 3, 7), [Shard(1, SEG)], Shard(1, ((4, 1),))),
    ("slice cuts a shard", aten.slice.Tensor, (T(2, 7, 8), 1, 0, 5), [Shard(1, SEG)], REPLICATE),
    ("slice another dim", aten.slice.Tensor, (T(2, 7, 8), 2, 0, 4), [Shard(1, SEG)], Shard(1, SEG)),
    ("mm rows", aten.mm.default, (T(7, 8), T(8, 5)), [Shard(0, SEG), REPLICATE], Shard(0, SEG)),
    ("mm columns", aten.mm.default, (T(5, 8), T(8, 7)), [REPLICATE, Shard(1, SEG)], Shard(1, SEG)),
    ("mm contracts the split", aten.mm.default, (T(5, 7), T(7, 4)), [Shard(1, SEG), REPLICATE], Partial("sum")),
    ("bmm batch", aten.bmm.default, (T(7, 2, 3), T(7, 3, 4)), [Shard(0, SEG), REPLICATE], Shard(0, SEG)),
    ("bmm K^T V", aten.bmm.default, (T(2, 8, 7), T(2, 7, 8)), [Shard(2, SEG), Shard(1, SEG)], Partial("sum")),
    ("addmm rows", aten.addmm.default, (T(5), T(7, 8), T(8, 5)), [REPLICATE, Shard(0, SEG), REPLICATE], Shard(0, SEG)),
    ("layer norm", aten.native_layer_norm.default, (T(2, 7, 8), [8], T(8), T(8), 1e-5),
     [Shard(1, SEG), REPLICATE, REPLICATE], [Shard(1, SEG)] * 3),
    ("softmax over the split", aten._softmax.default, (T(2, 7, 8), 1, False), [Shard(1, SEG)], REPLICATE),
    ("sum over the split", aten.sum.dim_IntList, (T(2, 7, 8), [1]), [Shard(1, SEG)], Partial("sum")),
    ("amax keepdim", aten.amax.default, (T(2, 7, 8), [2], True), [Shard(1, SEG)], Shard(1, SEG)),
    # convolution [B, C, H, W] split over H: a same-size window with stride 1 takes a halo of rows
    ("conv over rows", aten.convolution.default, (T(2, 4, 6, 5), T(4, 1, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 4),
     [Shard(2, plain(6)), REPLICATE], Shard(2, plain(6))),
    ("conv 1x1 over rows", aten.convolution.default, (T(2, 4, 6, 5), T(8, 4, 1, 1), T(8), [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
     [Shard(2, plain(6)), REPLICATE, REPLICATE], Shard(2, plain(6))),
    ("conv strided over rows", aten.convolution.default, (T(2, 4, 6, 5), T(4, 4, 3, 3), None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1),
     [Shard(2, plain(6)), REPLICATE], REPLICATE),
    ("conv shrinks the rows", aten.convolution.default, (T(2, 4, 6, 5), T(4, 4, 3, 3), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
     [Shard(2, plain(6)), REPLICATE], REPLICATE),
    ("conv halo taller than a chunk", aten.convolution.default, (T(2, 4, 3, 5), T(4, 4, 5, 5), None, [1, 1], [2, 2], [1, 1], False, [0, 0], 1),
     [Shard(2, plain(3)), REPLICATE], REPLICATE),
    ("conv over segmented rows", aten.convolution.default, (T(2, 4, 7, 5), T(4, 4, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
     [Shard(2, SEG), REPLICATE], REPLICATE),
    ("conv over the batch", aten.convolution.default, (T(2, 4, 6, 5), T(4, 4, 3, 3), None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1),
     [Shard(0, plain(2)), REPLICATE], Shard(0, plain(2))),
    ("cat on the split", aten.cat.default, ([T(2, 3, 8), T(2, 4, 8)], 1),
     [Shard(1, plain(3)), Shard(1, plain(4))], Shard(1, SEG)),
]


@pytest.mark.parametrize("name, op, args, placements, expected", ROWS, ids=[r[0] for r in ROWS])
def test_rule_table(name, op, args, placements, expected):
    node, fakes = one_op(op, *args)
    d = decide(node, dict(zip(fakes, placements, strict=True)), GROUP)
    assert d.out == expected, (name, d)
    assert (d.reason is not None) == (expected == REPLICATE), (name, d.reason)


def test_localize_rewrites_sizes_and_offsets():
    node, (x, *_) = one_op(aten.slice.Tensor, torch.randn(2, 7, 8), 1, 3, 7)
    d = decide(node, {x: Shard(1, SEG)}, GROUP)
    target, args, kwargs = localize(node, d, GROUP)  # rank 1 of 2 holds text 1 (3 -> 2, 1) and image 2 (4 -> 2, 2)
    assert (kwargs["start"], kwargs["end"]) == (1, 3)
    node, (x,) = one_op(aten.view.default, torch.randn(2, 7, 8), [14, 8])
    _, _, kwargs = localize(node, decide(node, {x: Shard(1, SEG)}, GROUP), GROUP)
    assert kwargs["size"] == [6, 8]
    node, (x,) = one_op(aten.mean.dim, torch.randn(2, 7, 8), [1])
    target, _, kwargs = localize(node, decide(node, {x: Shard(1, SEG)}, GROUP), GROUP)
    assert target is partial_mean and kwargs["count"] == 7


# --- placement.py: the layout arithmetic -------------------------------------------------------


@pytest.mark.parametrize(
    "layout, parts, rank, size, ranges",
    [
        (plain(7), 2, 0, 4, [(0, 4)]),  # torch.tensor_split: the first ranks take the extra item
        (plain(7), 2, 1, 3, [(4, 3)]),
        (plain(2), 4, 3, 0, []),  # fewer items than ranks: empty chunks
        (SEG, 2, 0, 4, [(0, 2), (3, 2)]),  # segment by segment
        (SEG, 2, 1, 3, [(2, 1), (5, 2)]),
        (((3, 4),), 2, 1, 4, [(8, 4)]),  # units of 4 items: [S, D] flattened with S split
    ],
)
def test_local_sizes_and_ranges(layout, parts, rank, size, ranges):
    assert local_size(layout, parts, rank) == size
    assert local_ranges(layout, parts, rank) == ranges
    assert sum(local_size(layout, parts, r) for r in range(parts)) == global_size(layout)


def test_factor_layout_inverts_repeat_and_scale():
    assert factor_layout(repeat(scale_units(SEG, 4), 2), 2, 4) == SEG
    assert factor_layout(SEG * 2, 3, 1) is None  # 2 periods cannot be 3
    assert factor_layout(((3, 2),), 1, 4) is None  # a unit of 2 is not a multiple of 4
    assert normalize(((0, 1), (3, 1), (2, 0))) == ((3, 1),)


def test_layouts_that_give_every_rank_the_same_items():
    assert same_split(plain(1024), ((32, 32),), 2) and same_split(plain(1024), ((32, 32),), 4)
    assert not same_split(plain(1024), ((32, 32),), 3)  # 342 tokens are not whole rows of 32
    assert in_units(plain(1024), 32, 2) == ((32, 32),) and in_units(plain(1024), 32, 3) is None
    assert in_units(plain(30), 7, 2) is None  # 30 tokens are not rows of 7
    assert in_units(SEG * 2, 1, 2) == SEG * 2


def test_a_convolution_over_rows_runs_with_its_neighbours_borders():
    """Localised, a padded convolution over split rows becomes the halo convolution; its rows with
    the neighbours' borders (zeros at the ends) give each rank its rows of the whole convolution."""
    x, weight = torch.randn(1, 3, 7, 5), torch.randn(3, 1, 5, 3)
    node, (xn, wn) = one_op(aten.convolution.default, x, weight, None, [1, 1], [2, 1], [1, 1], False, [0, 0], 3)
    d = decide(node, {xn: Shard(2, plain(7)), wn: REPLICATE}, GROUP)
    target, _, kwargs = localize(node, d, GROUP)
    assert target is halo_convolution and (kwargs["dim"], kwargs["halo"], kwargs["rank"]) == (2, 2, 1)
    whole = torch.nn.functional.conv2d(x, weight, padding=[2, 1], groups=3)
    for parts in (2, 3):
        chunks = torch.tensor_split(x, parts, dim=2)
        for rank, chunk in enumerate(chunks):
            above = chunks[rank - 1][:, :, -2:] if rank > 0 else None
            below = chunks[rank + 1][:, :, :2] if rank < parts - 1 else None
            rows = with_borders(chunk, 2, 2, above, below)
            got = torch.nn.functional.conv2d(rows, weight, padding=[0, 1], groups=3)
            assert torch.allclose(got, torch.tensor_split(whole, parts, dim=2)[rank], atol=1e-5), (parts, rank)


def test_a_new_tensor_borrows_only_dtype_and_device():
    """``x.new_ones(sizes)``: the result has the sizes given, whatever the split of ``x``, which stays."""
    node, (x,) = one_op(aten.new_ones.default, torch.randn(2, 7, 8), [4, 16])
    d = decide(node, {x: Shard(1, SEG)}, GROUP)
    assert d.reason is None and d.out == REPLICATE and d.inputs[x] == Shard(1, SEG)
