"""passes/cse.py: which repeated computations merge, and which must not."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from para_fx.passes.cse import merge_common_subexpressions

aten = torch.ops.aten


def _ops(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_a_repeated_chain_is_computed_once_and_the_outputs_stay():
    def quantize_twice(x):
        a = (x / x.abs().amax(dim=1, keepdim=True)).to(torch.float8_e4m3fn)
        b = (x / x.abs().amax(dim=1, keepdim=True)).to(torch.float8_e4m3fn)
        return a.float() + 1.0, b.float() - 1.0

    x = torch.randn(4, 8)
    gm = make_fx(quantize_twice)(x)
    before = _ops(gm).count(aten.amax.default)
    assert merge_common_subexpressions(gm) == 5  # abs, amax, div, the fp8 copy, and its float copy
    assert (before, _ops(gm).count(aten.amax.default)) == (2, 1)
    for got, want in zip(gm(x), quantize_twice(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_different_literals_random_ops_and_signed_zeros_stay_apart():
    def distinct(x):
        return x.sum(0), x.sum(1), x + 0.0, x + -0.0, torch.rand_like(x), torch.rand_like(x)

    gm = make_fx(distinct)(torch.randn(3, 3))
    assert merge_common_subexpressions(gm) == 0


def test_a_graph_that_mutates_is_left_alone():
    """Two equal reads around an in-place write differ."""

    def read_write_read(x, state):
        before = state.clone()
        state.add_(x)
        return before, state.clone()

    gm = make_fx(read_write_read)(torch.randn(3), torch.zeros(3))
    nodes = len(gm.graph.nodes)
    assert merge_common_subexpressions(gm) == 0 and len(gm.graph.nodes) == nodes
