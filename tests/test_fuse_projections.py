"""Sibling projections fused into one matmul: which ones fuse, the same outputs, and weights that
follow the model's parameters when they change after compiling."""

import pytest
import torch
import torch.fx as fx

import para_fx
from para_fx.testing import zoo
from para_fx.testing.dits import Fp8Linear
from para_fx.core.backend import recording
from para_fx.inspect.explain import simulated_mesh
from para_fx.passes.fuse_projections import fuse_projections
from traced import each_backend


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
    """On a simulated mesh (which projections fuse) and on one device (the outputs), one Dynamo
    trace for both (tests/traced.py)."""
    model, kwargs = zoo.flux(height=4, width=6, text_len=4)
    with torch.no_grad():
        expected = model(**kwargs)[0]
    with simulated_mesh(2, ulysses=2) as mesh:
        backends = [
            para_fx.backend(mesh=mesh, compiler="eager", fuse_projections=True),
            para_fx.backend(compiler="aot_eager", fuse_projections=True),
        ]
        (report, _), (_, (output,)) = each_backend(model, kwargs, backends)
    # two double-stream blocks: image and text q/k/v; two single-stream blocks: q/k/v, without the
    # MLP input projection, which feeds no attention of its block
    assert report.fused_projections == [3, 3, 3, 3, 3, 3]
    assert ["projections fused", "18 matmuls into 6"] in report.summary()
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)


def test_off_by_default():
    """On the small model whose projections fuse (test_projections_of_one_activation_fuse_by_bias_and_others_stay)."""
    torch._dynamo.reset()
    with recording() as unfused:
        torch.compile(Projections(), backend=para_fx.backend(compiler="eager"))(torch.randn(5, 8), torch.randn(5, 8))
    torch._dynamo.reset()
    assert unfused.graph_count == 1 and unfused.fused_projections == []


class Fp8Projections(torch.nn.Module):
    """Three fp8 projections of one activation, each quantizing it itself (as torchao's do), and
    one of another activation."""

    def __init__(self, scale_column: bool):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.other = (Fp8Linear(torch.nn.Linear(16, n), scale_column) for n in (16, 16, 8, 16))

    def forward(self, x, y):
        h = torch.relu(x)
        return self.q(h) * self.k(h), self.v(h), self.other(y)


@pytest.mark.parametrize("scale_column", [True, False], ids=["scales [out, 1] transposed", "scales [1, out]"])
def test_fp8_projections_quantize_their_activation_once_fuse_and_match_eager(scale_column):
    model = Fp8Projections(scale_column)
    x, y = torch.randn(6, 16), torch.randn(6, 16)
    torch._dynamo.reset()
    with recording() as report:
        compiled = torch.compile(model, backend=para_fx.backend(compiler="aot_eager", fuse_projections=True))
        outputs = compiled(x, y)
    assert report.fused_projections == [3]
    assert any(note.startswith("fp8: ") and "repeated node(s) merged" in note for note in report.notes)
    assert any(note.startswith("projections fused: 3 matmuls of shared activations as 1") for note in report.notes)
    final = report.graphs["fuse_projections"]
    assert final.count("aten._scaled_mm.default(") == 2  # q/k/v as one, `other` alone
    assert final.count("aten.amax.default(") == 2  # one quantization of h, one of y
    for got, want in zip(outputs, model(x, y)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():  # new fp8 weights and scales after compiling: the fused copy follows
        model.k.weight.copy_(torch.randn(16, 16).to(torch.float8_e4m3fn))
        model.v.weight_scale.mul_(2.0)
    for got, want in zip(compiled(x, y), model(x, y)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fp8_projections_fuse_with_scales_per_row_not_per_tensor():
    """A scale per tensor cannot be concatenated: the fused weights would need one between them."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def siblings(x, x_scale, w1, w2, w3, s1, s2, s3):
        return [torch._scaled_mm(x, w.t(), x_scale, s.t(), out_dtype=torch.float32) for w, s in ((w1, s1), (w2, s2), (w3, s3))]

    fp8 = lambda *shape: torch.randn(*shape).to(torch.float8_e4m3fn)  # noqa: E731
    for rows, scale_shape, fused in ((6, (16, 1), 1), (1, (1, 1), 0)):
        inputs = [fp8(rows, 16), torch.rand(rows, 1), *(fp8(16, 16) for _ in range(3)), *(torch.rand(*scale_shape) for _ in range(3))]
        if scale_shape == (1, 1):  # per tensor on both sides: scalars
            inputs = [x.reshape(()) if x.dtype == torch.float32 else x for x in inputs]
        gm = make_fx(siblings)(*inputs)
        assert len(fuse_projections(gm, inputs)) == fused
