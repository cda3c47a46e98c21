"""Sibling projections fused into one matmul: which ones fuse, the same outputs, and weights that
follow the model's parameters when they change after compiling."""

import torch
import torch.fx as fx

import para_fx
from para_fx.testing import zoo
from para_fx.core.backend import recording
from para_fx.inspect.explain import simulated_mesh
from para_fx.passes.fuse_projections import fuse_projections


class Projections(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, n) for n in (8, 8, 4))
        self.no_bias_a, self.no_bias_b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
        self.other = torch.nn.Linear(8, 8)

    def forward(self, x, y):
        h = torch.relu(x)
        return self.q(h) * self.k(h), self.v(h), self.no_bias_a(h) - self.no_bias_b(h), self.other(y)


def _captured(model, *inputs) -> tuple[fx.GraphModule, list]:
    from para_fx.core.capture import capture_aten

    captured = {}

    def grab(gm, example_inputs):
        captured["graph"] = capture_aten(gm, example_inputs)
        captured["inputs"] = list(example_inputs)
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=grab)(*inputs)
    return captured["graph"], captured["inputs"]


def test_projections_of_one_activation_fuse_by_bias_and_others_stay():
    gm, inputs = _captured(Projections(), torch.randn(5, 8), torch.randn(5, 8))
    groups = fuse_projections(gm, inputs)
    assert sorted((len(g.weights), g.biases is not None) for g in groups) == [(2, False), (3, True)]
    matmuls = [n.target for n in gm.graph.nodes if n.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)]
    assert len(matmuls) == 3  # q/k/v as one, the two bias-free ones as one, `other` alone


def test_same_outputs_and_weights_follow_in_place_updates():
    torch.manual_seed(0)
    model = Projections()
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=para_fx.backend(compiler="inductor", fuse_projections=True))
    for got, want in zip(compiled(x, y), model(x, y)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # an update after compiling: the fused copy must be rebuilt
        model.k.weight.mul_(3.0)
        model.no_bias_b.weight.copy_(torch.randn(8, 8))
    for got, want in zip(compiled(x, y), model(x, y)):
        torch.testing.assert_close(got, want)


def test_flux_fuses_each_blocks_projections_and_matches_eager():
    model, kwargs = zoo.flux(height=4, width=6, text_len=4)
    expected = model(**kwargs)[0]
    torch._dynamo.reset()
    with simulated_mesh(2, ulysses=2) as mesh, torch.no_grad(), recording() as report:
        torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager", fuse_projections=True))(**kwargs)
    # two double-stream blocks: image and text q/k/v; two single-stream blocks: q/k/v, without the
    # MLP input projection, which feeds no attention of its block
    assert report.fused_projections == [3, 3, 3, 3, 3, 3]
    assert ["projections fused", "18 matmuls into 6"] in report.summary()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=para_fx.backend(compiler="aot_eager", fuse_projections=True))
    torch.testing.assert_close(compiled(**kwargs)[0], expected, rtol=1e-4, atol=1e-4)


def test_off_by_default():
    """On the small model whose projections fuse (test_projections_of_one_activation_fuse_by_bias_and_others_stay)."""
    torch._dynamo.reset()
    with recording() as unfused:
        torch.compile(Projections(), backend=para_fx.backend(compiler="eager"))(torch.randn(5, 8), torch.randn(5, 8))
    torch._dynamo.reset()
    assert unfused.graph_count == 1 and unfused.fused_projections == []
