"""passes/fp8_rows.py and para_fx::quantize_rows: torchao's per-row fp8 quantisation of a wide
``gelu`` or ``cat(x, gelu)`` as one op of para-fx's.

On CUDA the op runs a Triton kernel (the GPU test below); on the CPU it runs torchao's arithmetic
as aten ops, so the CPU tests enable the pass there and expect torchao's own results bit for bit.
torchao refuses its fp8 configs on a CPU; the tests skip that check, its kernels run there."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import para_fx
from para_fx.core.backend import recording
from para_fx.passes import fp8_rows
from para_fx.passes.fp8_rows import quantize_wide_rows

aten = torch.ops.aten
WIDE, PLAIN = 4608, 1024  # wider than the rows Inductor keeps in registers (4096)


class SingleBlockOutput(torch.nn.Module):
    """A DiT single block's end: ``proj_out(cat(attention, gelu(mlp)))``, fp8 when quantized."""

    def __init__(self, width: int = WIDE, plain: int = PLAIN):
        super().__init__()
        self.mlp = torch.nn.Linear(64, width)
        self.proj_out = torch.nn.Linear(plain + width, 64)

    def forward(self, attention, x):
        return self.proj_out(torch.cat([attention, F.gelu(self.mlp(x), approximate="tanh")], dim=-1))


class FeedForward(torch.nn.Module):
    def __init__(self, width: int = WIDE, approximate: str = "tanh"):
        super().__init__()
        self.up, self.down, self.approximate = torch.nn.Linear(64, width), torch.nn.Linear(width, 64), approximate

    def forward(self, attention, x):
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


def fp8(model: torch.nn.Module, monkeypatch) -> torch.nn.Module:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quant_api, quantize_

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    torch.manual_seed(0)
    model = model.to(torch.bfloat16)
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    return model


def inputs(plain: int = PLAIN):
    torch.manual_seed(1)
    return torch.randn(2, 8, plain, dtype=torch.bfloat16), torch.randn(2, 8, 64, dtype=torch.bfloat16)


def compiled_report(model, args, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=para_fx.backend(compiler="aot_eager", **options))
    with recording() as report, torch.no_grad():
        out = compiled(*args)
    torch._dynamo.reset()
    return out, report


def rows_note(report) -> str | None:
    return next((n for n in report.notes if n.startswith("wide fp8 rows")), None)


@pytest.mark.parametrize("cls", [SingleBlockOutput, FeedForward])
def test_torchaos_quantisation_becomes_one_op_and_gives_its_bits(cls, monkeypatch):
    """Both patterns become one quantize_rows each: the amax and the casts gone, the output equal to
    torchao's eager one, and the report names the op and the model's line."""
    monkeypatch.setattr(fp8_rows, "DEVICES", ("cpu",))
    model, args = fp8(cls(), monkeypatch), inputs()
    with torch.no_grad():
        expected = model(*args)
    out, report = compiled_report(model, args)
    assert torch.equal(out, expected)
    assert rows_note(report).startswith("wide fp8 rows: 1 fp8 matmul input(s)"), report.notes
    assert "test_fp8_rows.py" in rows_note(report)
    graph = report.graphs["wide_fp8_rows"]
    assert graph.count("para_fx.quantize_rows.default(") == 1
    assert "aten.amax" not in graph.split("quantize_rows")[1]  # the wide row's amax went into the op
    off, report = compiled_report(model, args, wide_fp8_rows=False)
    assert rows_note(report) is None and torch.equal(off, expected)


def test_with_the_cache_each_blocks_op_runs_in_its_branch_with_equal_outputs(monkeypatch):
    """A DiT whose feed-forwards are WIDE wide, fp8, under the First Block Cache: each block's
    quantisation becomes the op (the second block's inside the cond), and two steps, the second
    skipped, give the outputs of the same compile without the pass; sharded over 2 ranks, the
    local rows are rewritten the same."""
    from para_fx.testing import dits

    class WideMLP(dits.MLP):
        def __init__(self, dim: int, hidden: int):
            super().__init__(dim, WIDE)

    monkeypatch.setattr(fp8_rows, "DEVICES", ("cpu",))
    monkeypatch.setattr(dits, "MLP", WideMLP)
    model, kwargs = dits.patch_dit(depth=2)
    model = fp8(model, monkeypatch)
    steps = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kwargs.items()}]
    steps.append({**steps[0], "timestep": steps[0]["timestep"] * 0.999})
    outs, notes, skipped = {}, {}, {}
    for on in (True, False):
        torch._dynamo.reset()
        cache = para_fx.FirstBlockCache(threshold=0.5)
        compiled = torch.compile(model, backend=para_fx.backend(compiler="aot_eager", cache=cache, wide_fp8_rows=on))
        with recording() as report, torch.no_grad():
            outs[on] = [compiled(**step) for step in steps]
        notes[on], skipped[on] = rows_note(report), para_fx.cache_stats(compiled).skipped
    torch._dynamo.reset()
    assert notes[True].startswith("wide fp8 rows: 2 fp8 matmul input(s)") and notes[False] is None
    assert skipped == {True: 1, False: 1}
    for got, expected in zip(outs[True], outs[False]):
        assert torch.equal(got, expected)
    sharded = para_fx.explain(model, kwargs=steps[0], world_size=2)  # after the sequence's shard pass too
    torch._dynamo.reset()
    assert rows_note(sharded).startswith("wide fp8 rows: 2 fp8 matmul input(s)"), sharded.notes


@pytest.mark.parametrize("case", ["narrow", "exact gelu", "cuda only"])
def test_what_inductor_keeps_is_left_alone(case, monkeypatch):
    """Rows of 4096 values or fewer (Inductor's own kernel reads them once, its producer fused), an
    exact gelu (the kernel computes the tanh form), and, by default, a device other than CUDA."""
    if case != "cuda only":
        monkeypatch.setattr(fp8_rows, "DEVICES", ("cpu",))
    model = {"narrow": FeedForward(width=4096), "exact gelu": FeedForward(approximate="none"),
             "cuda only": FeedForward()}[case]
    _, report = compiled_report(fp8(model, monkeypatch), inputs())
    assert rows_note(report) is None and "wide_fp8_rows" not in report.graphs


def test_op_is_torchaos_arithmetic():
    """The op's aten form against torchao's own quantisation functions, value for value."""
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    attention, _ = inputs()
    hidden = torch.randn(2, 8, WIDE, dtype=torch.bfloat16)
    gelu = F.gelu(hidden, approximate="tanh")
    for plain, rows in ((attention, torch.cat([attention, gelu], dim=-1)), (None, gelu)):
        scale = _choose_scale_float8(rows, block_size=[1, 1, rows.shape[-1]], float8_dtype=torch.float8_e4m3fn)
        quantised = _quantize_affine_float8(rows, scale, torch.float8_e4m3fn)
        got, got_scale = torch.ops.para_fx.quantize_rows(plain, hidden)
        assert got.shape == rows.shape and got_scale.shape == (2, 8, 1)
        assert torch.equal(got_scale, scale.reshape(got_scale.shape))
        assert torch.equal(got.view(torch.uint8), quantised.view(torch.uint8))


def test_fake_cuda_graph_of_the_pattern_is_rewritten():
    """On fake CUDA tensors (the CPU build has no Triton: the op's aten form gives the shapes) the
    pass rewrites a quantisation read by two matmuls once, and its scales' other reader follows."""

    def quantise_twice(hidden, w1, w2):
        rows = F.gelu(hidden, approximate="tanh")
        scale = (rows.abs().amax(dim=-1, keepdim=True) / 448.0).to(torch.float32)
        q = (rows.to(torch.float32) / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        flat, flat_scale = q.reshape(-1, q.shape[-1]), scale.reshape(-1, 1)
        first = torch._scaled_mm(flat, w1.t(), flat_scale, torch.ones(1, 64, device=hidden.device), out_dtype=torch.bfloat16)
        second = torch._scaled_mm(flat, w2.t(), flat_scale, torch.ones(1, 64, device=hidden.device), out_dtype=torch.bfloat16)
        return first + second, scale.sum()

    with FakeTensorMode():
        args = (torch.randn(2, 8, WIDE, device="cuda", dtype=torch.bfloat16),
                *(torch.randn(64, WIDE, device="cuda").to(torch.float8_e4m3fn) for _ in range(2)))
        gm = make_fx(quantise_twice)(*args)
    assert len(quantize_wide_rows(gm)) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.para_fx.quantize_rows.default) == 1
    assert aten.amax.default not in targets and aten.clamp.default not in targets
    assert targets.count(aten._scaled_mm.default) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", [SingleBlockOutput, FeedForward])
def test_triton_kernel_gives_torchaos_bits_on_the_gpu(cls):
    """With Inductor on a GPU: the kernel runs inside the compiled graph, its output within one fp8
    rounding of torchao's eager one (the gelu's float32 differs in its last bits from eager's)."""
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    torch.manual_seed(0)
    model = cls(**{"width": 12288, **({"plain": 3072} if cls is SingleBlockOutput else {})}).to("cuda", torch.bfloat16)
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    args = [torch.randn(4, 512, width, device="cuda", dtype=torch.bfloat16) for width in (3072, 64)]
    with torch.no_grad():
        expected = model(*args).float()
        outs = {}
        for on in (True, False):
            torch._dynamo.reset()
            with recording() as report:
                out, (code, *_) = run_and_get_code(torch.compile(model, backend=para_fx.backend(wide_fp8_rows=on)), *args)
            assert (rows_note(report) is not None) == on
            assert ("quantize_rows_kernel" in code) == on
            outs[on] = float((out.float() - expected).norm() / expected.norm())
    torch._dynamo.reset()
    assert outs[True] < max(1.5 * outs[False], 1e-3), outs
