"""passes/gelu_epilogues.py: a linear layer and its gelu as one aten._addmm_activation.

On CUDA the op's gelu is the tanh approximation, computed in cuBLASLt's epilogue; these graphs are
traced on fake CUDA tensors. On the CPU the op runs addmm and then the exact gelu, the same
arithmetic as the model: the numeric checks enable that device's entry."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import para_fx
from para_fx.core.backend import recording
from para_fx.passes import gelu_epilogues
from para_fx.passes.gelu_epilogues import fuse_gelu_epilogues
from para_fx.testing import dits

aten = torch.ops.aten
CPU_EXACT = {"cpu": "none"}


def feed_forward(x, w1, b1, w2, b2, approximate="tanh"):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def ff_inputs(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    shapes = [(2, 5, 8), (32, 8), (32,), (8, 32), (8,)]
    return [torch.randn(s, device=device, dtype=dtype) for s in shapes]


def ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def cuda_graph(fn, *, approximate="tanh"):
    with FakeTensorMode():
        inputs = ff_inputs("cuda", torch.bfloat16)
        return make_fx(lambda *a: fn(*a, approximate=approximate))(*inputs)


def test_cuda_linear_and_tanh_gelu_become_one_matmul():
    gm = cuda_graph(feed_forward)
    fused = fuse_gelu_epilogues(gm)
    assert len(fused) == 1
    assert ops(gm).count(aten._addmm_activation.default) == 1
    assert aten.gelu.default not in ops(gm)
    assert ops(gm).count(aten.addmm.default) == 1  # the second projection, no gelu after it


def test_cuda_exact_gelu_is_left_alone():
    """cuBLASLt's epilogue computes the tanh approximation only."""
    gm = cuda_graph(feed_forward, approximate="none")
    assert fuse_gelu_epilogues(gm) == []
    assert aten._addmm_activation.default not in ops(gm)


def test_matmul_read_by_anything_else_is_left_alone():
    def both(x, w1, b1, w2, b2, approximate):
        hidden = F.linear(x, w1, b1)
        return F.gelu(hidden, approximate=approximate), hidden.sum()

    assert fuse_gelu_epilogues(cuda_graph(both)) == []


def test_scaled_matmul_is_left_alone():
    def scaled(x, w1, b1, w2, b2):
        return F.gelu(torch.addmm(b1, x[0], w1.t(), beta=0.5))

    gm = make_fx(scaled, tracing_mode="fake")(*ff_inputs())
    assert aten.addmm.default in ops(gm)
    assert fuse_gelu_epilogues(gm, CPU_EXACT) == []


def test_device_without_an_entry_is_left_alone():
    gm = make_fx(lambda *a: feed_forward(*a, approximate="none"), tracing_mode="fake")(*ff_inputs())
    assert fuse_gelu_epilogues(gm) == []  # the default table has CUDA only


def test_same_outputs_bit_for_bit_on_the_cpu():
    inputs = ff_inputs()
    gm = make_fx(lambda *a: feed_forward(*a, approximate="none"), tracing_mode="fake")(*inputs)
    expected = gm(*inputs)
    assert len(fuse_gelu_epilogues(gm, CPU_EXACT)) == 1
    assert aten._addmm_activation.default in ops(gm)
    assert torch.equal(gm(*inputs), expected)


class ExactGeluMLP(dits.MLP):
    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def exact_gelu_dit(monkeypatch):
    monkeypatch.setattr(gelu_epilogues, "GELU_IN_EPILOGUE", CPU_EXACT)
    monkeypatch.setattr(dits, "MLP", ExactGeluMLP)
    return dits.patch_dit()


def test_backend_reports_and_keeps_outputs_with_the_cache(monkeypatch):
    model, kwargs = exact_gelu_dit(monkeypatch)
    depth = sum(isinstance(m, ExactGeluMLP) for m in model.modules())
    assert depth > 1
    with torch.no_grad():
        expected = dits.first_tensor(model(**kwargs))
        for cache in (None, para_fx.FirstBlockCache(threshold=0.08)):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=para_fx.backend(compiler="aot_eager", cache=cache))
            with recording() as report:
                torch.testing.assert_close(dits.first_tensor(compiled(**kwargs)), expected, rtol=1e-5, atol=1e-5)
            assert [n for n in report.notes if n.startswith(f"gelu epilogues: {depth} ")]
            # the graph Inductor would get; with the cache, traced again with the first block outside the cond
            last = list(report.graphs.values())[-1]
            assert last.count("aten._addmm_activation.default(") == (depth if cache is None else 1)
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    note = next(n for n in report.notes if n.startswith("gelu epilogues"))
    assert note.startswith(f"gelu epilogues: {depth} linear layer(s)")
    assert "test_matmul_epilogue.py" in note and "self.fc1(x)" in note  # the model's line
    assert "gelu_epilogues" in report.graphs


def test_option_off_keeps_them_apart(monkeypatch):
    model, kwargs = exact_gelu_dit(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=para_fx.backend(compiler="eager", gelu_epilogues=False))
    with recording() as report, torch.no_grad():
        compiled(**kwargs)
    assert not [n for n in report.notes if n.startswith("gelu epilogues")]
    torch._dynamo.reset()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cpu_kernel_computes_the_gelu_the_table_says(approximate):
    """The table's premise on this device: _addmm_activation's gelu on the CPU is the exact one."""
    x, w, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    same = torch.allclose(aten._addmm_activation(b, x, w, use_gelu=True), F.gelu(torch.addmm(b, x, w), approximate=approximate))
    assert same == (approximate == CPU_EXACT["cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flux_on_one_gpu_in_bf16():
    """The tanh gelu in cuBLASLt's epilogue on FLUX's 6 feed-forwards (2 double blocks: image and
    text; 2 single blocks): as close to float32 eager as Inductor's own gelu, within bf16's noise."""
    from para_fx.testing import zoo

    model, kwargs = zoo.flux()
    reference = dits.first_tensor(model(**kwargs)).float()
    model, kwargs = model.to("cuda", torch.bfloat16), {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    kwargs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    errors = {}
    for on in (True, False):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=para_fx.backend(gelu_epilogues=on))
        with recording() as report, torch.no_grad():
            out = dits.first_tensor(compiled(**kwargs)).float().cpu()
        assert bool([n for n in report.notes if n.startswith("gelu epilogues: 6 ")]) == on
        errors[on] = float((out - reference).norm() / reference.norm())
    torch._dynamo.reset()
    assert errors[True] < max(2 * errors[False], 1e-2), errors
