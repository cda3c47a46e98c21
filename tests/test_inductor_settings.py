"""torch.compile's mode/options and para's comm/compute overlap settings reach the Inductor compile."""

import pytest
import torch
import torch._inductor.comms as comms
from torch._inductor import config
from torch._inductor.virtualized import V

import para_fx
from para_fx.core.backend import OVERLAP_PASSES


def compile_and_record(monkeypatch, **compile_kwargs):
    """Compile a small model with the para backend; the Inductor config its scheduler saw (inside
    code generation: size_asserts too, read by one compile rather than a C++ build of its own)."""
    seen = []
    original = comms.reorder_compute_and_comm_for_overlap

    def record(nodes):
        seen.append(dict(passes=list(config.reorder_for_compute_comm_overlap_passes), max_autotune=config.max_autotune,
                         epilogue_fusion=config.epilogue_fusion, size_asserts=config.size_asserts,
                         choices=type(V.choices).__name__))
        return original(nodes)

    monkeypatch.setattr(comms, "reorder_compute_and_comm_for_overlap", record)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    x = torch.randn(4, 8)
    compiled = torch.compile(model, **compile_kwargs)
    with torch.no_grad(), config.patch(force_disable_caches=True):  # a cache hit would skip the scheduler
        torch.testing.assert_close(compiled(x), model(x))
    torch._dynamo.reset()
    return seen


def test_overlap_passes_reach_inductor(monkeypatch):
    seen = compile_and_record(monkeypatch, backend=para_fx.backend())
    assert seen, "Inductor's scheduler never ran the comm/compute reordering"
    assert seen[0]["passes"] == [p for p in OVERLAP_PASSES if hasattr(comms, p)]
    assert seen[0]["passes"], "no overlap pass of para's list exists in this torch"
    # Dynamo's guards check the inputs; Inductor's per-call size asserts are off by default
    assert [s["size_asserts"] for s in seen] == [False]
    assert [s["choices"] for s in seen] == ["WideRowReductions"]  # rows up to 4096 values read once


def test_mode_and_options_reach_inductor(monkeypatch):
    seen = compile_and_record(
        monkeypatch, backend="para", mode="max-autotune-no-cudagraphs",
    )
    assert seen and seen[0]["max_autotune"] is True
    seen = compile_and_record(
        monkeypatch, backend="para", options={"epilogue_fusion": False, "size_asserts": True, "inductor_choices_class": None}
    )
    assert seen and seen[0]["epilogue_fusion"] is False
    assert [s["size_asserts"] for s in seen] == [True]  # unless asked (the default: test_overlap_passes_reach_inductor)
    assert [s["choices"] for s in seen] == ["InductorChoices"]


def test_bad_mode_and_options_are_refused():
    model = torch.nn.Linear(4, 4)
    for kwargs, message in (
        (dict(mode="fastest"), "unknown mode 'fastest'"),
        (dict(options={"no_such_option": 1}), "unknown Inductor options"),
    ):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            torch.compile(model, backend="para", **kwargs)(torch.randn(2, 4))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="compiler is 'aot_eager'"):
        torch.compile(model, backend=para_fx.backend(compiler="aot_eager"), mode="max-autotune")(torch.randn(2, 4))
    torch._dynamo.reset()


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        split = lambda t: t.unflatten(-1, (2, 8)).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(o.transpose(1, 2).flatten(2))


def test_parameters_reach_inductor_as_static_inputs(monkeypatch):
    """CUDA graphs copy every input that is not static on each call: the weights (and the fused
    projections' concatenated weights) must stay static through para's re-traced graphs."""
    import torch._functorch.aot_autograd as aot

    original = aot._try_get_metadata_from_dynamo
    seen = []

    def record(mod, *args):
        sources, static = original(mod, *args)
        seen.append((len(mod.graph.find_nodes(op="placeholder")), sorted(static)))
        return sources, static

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", record)
    model = _Attention()
    x = torch.randn(2, 6, 16)
    weights = len(list(model.parameters()))
    for backend, fused in ((para_fx.backend(), 0), (para_fx.backend(fuse_projections=True), 2)):
        seen.clear()
        torch._dynamo.reset()
        with torch.no_grad(), config.patch(force_disable_caches=True):
            torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
        (inputs, static), = seen
        assert inputs == weights + 1 + fused, seen  # the weights, x, the fused weight and bias
        not_static = set(range(inputs)) - set(static)
        assert len(not_static) == 1 and max(not_static) < weights + 1, seen  # only x; the fused ones come last
    torch._dynamo.reset()


def test_constants_the_trace_lifts_are_static_inputs_too(monkeypatch):
    """A tensor made in forward becomes an attribute of para's graph (``_tensor_constant0``);
    AOTAutograd lifts it as an input, which must be static and must have a source."""
    import torch._functorch.aot_autograd as aot

    original = aot._try_get_metadata_from_dynamo
    seen = []

    def record(mod, *args):
        sources, static = original(mod, *args)
        seen.append((dict(mod.named_buffers()), sorted(static)))
        return sources, static

    class WithConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.linear(x) + torch.tensor([1.0, 2.0])

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", record)
    model, x = WithConstant(), torch.randn(3, 2)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=para_fx.backend(compiler="aot_eager"))(x), model(x))
    torch._dynamo.reset()
    (constants, static), = seen
    assert len(constants) == 1 and static[0] == 0 and len(static) == 3, seen  # the constant, then the weights


def test_a_shape_compiled_at_call_time_uses_inductors_graph_cache():
    """The second shape of a frame is specialised and compiled at call time, outside Dynamo's
    tracing context: it must still reach Inductor's FX graph cache (a restarted server then loads
    every resolution it served before instead of compiling it again)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import clear_inductor_caches, fresh_inductor_cache

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    shapes = [torch.randn(4, 8), torch.randn(6, 8)]  # the second call makes Dynamo's graph dynamic
    outcomes = []
    with torch.no_grad(), fresh_inductor_cache(), config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
        for _ in ("cold", "warm"):
            torch._dynamo.reset()
            clear_inductor_caches()  # what a new process does not have: the files stay, as after a restart
            compiled = torch.compile(model, backend=para_fx.backend())
            for x in shapes:
                counters["inductor"].clear()
                torch.testing.assert_close(compiled(x), model(x))
                outcomes.append({k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")})
    torch._dynamo.reset()
    first_cold, second_cold, first_warm, second_warm = outcomes
    assert first_cold == second_cold == {"fxgraph_cache_miss": 1}, outcomes
    assert first_warm == second_warm == {"fxgraph_cache_hit": 1}, outcomes


def test_fp8_graphs_compile_with_each_rows_amax_unsplit_unless_asked():
    """A quantised matmul's per-row amax and its quantisation become one kernel with Inductor's
    split_reductions off (one H200: 4.4 ms less a FLUX step); explain says so; the user's own value wins."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from para_fx.core.backend import Options, _with_fp8_settings
    from para_fx.inspect.report import Report
    from para_fx.testing.dits import Fp8Linear

    model = torch.nn.Sequential(Fp8Linear(torch.nn.Linear(16, 16)), torch.nn.GELU())
    x = torch.randn(4, 16)
    with torch.no_grad():
        notes = para_fx.explain(model, (x,)).notes
        fp8_graph, plain_graph = make_fx(model)(x), make_fx(torch.nn.Linear(16, 16))(x)
    assert any(n.startswith("fp8: 1 scaled matmul(s)") and "'split_reductions': False" in n for n in notes)
    assert _with_fp8_settings(fp8_graph, Options(), Report()).inductor == {"split_reductions": False}
    asked = Options(inductor={"split_reductions": True})
    assert _with_fp8_settings(fp8_graph, asked, Report()).inductor == {"split_reductions": True}
    assert _with_fp8_settings(plain_graph, Options(), Report()).inductor == {}


def test_wide_rows_are_the_reductions_along_the_last_dim_inductor_would_loop_over():
    """Which reductions para has Inductor keep in registers: along the last dimension, wider than
    Inductor's own 1024 values and at most 4096 (a 12288-wide row was slower so on an H200)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from para_fx.core.reductions import wide_rows

    cases = [  # (function, its input's shape, reductions counted)
        (lambda x: torch.nn.functional.layer_norm(x, (2048,)), (3, 2048), 1),
        (lambda x: torch.nn.functional.layer_norm(x, (512,)), (3, 512), 0),
        (lambda x: torch.nn.functional.layer_norm(x, (8192,)), (3, 8192), 0),
        (lambda x: torch.nn.functional.layer_norm(x, (4, 1024)), (3, 4, 1024), 1),  # 4096 values a row
        (lambda x: x.abs().amax(dim=-1, keepdim=True), (5, 3072), 1),
        (lambda x: x.abs().amax(dim=1), (5, 3072), 1),
        (lambda x: x.abs().amax(dim=0), (3072, 5), 0),
        (lambda x: x.sum(dim=(0, 1)), (40, 3072), 0),
        (lambda x: x.mean(dim=-1) + x.var(dim=-1), (2, 3072), 2),
        (lambda x: x.sum(), (3072,), 0),  # a whole tensor, not rows
    ]
    for function, shape, expected in cases:
        graph = make_fx(function, tracing_mode="fake")(torch.randn(shape))
        rows = wide_rows(graph)
        assert len(rows) == expected, (shape, graph.code)


def test_explain_names_the_reductions_kept_in_registers_unless_turned_off():
    from torch.fx.experimental.proxy_tensor import make_fx

    from para_fx.core.backend import Options, _wide_rows_note
    from para_fx.inspect.report import Report
    from para_fx.testing.dits import patch_dit

    model, inputs = patch_dit(0, dim=2048, num_heads=16, depth=1)
    with torch.no_grad():
        notes = para_fx.explain(model, (), inputs).notes
    note, = [n for n in notes if n.startswith("persistent rows:")]
    assert "3 reduction(s)" in note and "dits.py" in note and "self.norm1(x)" in note, note
    graph = make_fx(lambda x: torch.nn.functional.layer_norm(x, (2048,)))(torch.randn(3, 2048))
    for inductor, notes in (({}, 1), ({"inductor_choices_class": None}, 0)):
        report = Report()
        _wide_rows_note(graph, Options(inductor=inductor), report)
        assert len(report.notes) == notes, report.notes


def test_a_compiles_choices_class_is_the_one_its_config_names():
    """Inductor builds its choices object once per thread and keeps it: the class a compile's
    patches name is installed for that compile alone, and the thread's own is back after it."""
    from para_fx.core.inductor_choices import WideRowReductions, choices_of

    before = V.choices
    with choices_of({"inductor_choices_class": WideRowReductions}):
        assert type(V.choices) is WideRowReductions
    assert V.choices is before and type(before) is not WideRowReductions
    with choices_of({"inductor_choices_class": None}):
        assert V.choices is before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_3072_wide_norm_is_read_once_on_the_gpu():
    """On a GPU, a DiT's modulated layer norm over 3072 values, alone and with an fp8 layer's row
    scales, compiles to a persistent kernel (``triton_per_``: the row read once), eager's to rounding."""
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    class NormedLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(3072, elementwise_affine=False, eps=1e-6)
            self.linear = torch.nn.Linear(3072, 256)

        def forward(self, x, scale):
            return self.linear(self.norm(x) * (1 + scale))

    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16)
    scale = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    for fp8 in (False, True):
        model = NormedLinear().to("cuda", torch.bfloat16)
        if fp8:
            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
        torch._dynamo.reset()
        with torch.no_grad(), config.patch(force_disable_caches=True):
            out, (code, *_) = run_and_get_code(torch.compile(model, backend="para"), x, scale)
            expected = model(x, scale)
        torch._dynamo.reset()
        kernels = [line.split()[0] for line in code.splitlines() if line.startswith("triton_") and " = async_compile" in line]
        norms = [k for k in kernels if "native_layer_norm" in k]
        assert norms and all(k.startswith("triton_per_") for k in norms), kernels
        assert not fp8 or any("amax" in k for k in norms), kernels  # the row scale in the norm's kernel
        error = (out.float() - expected.float()).norm() / expected.float().norm()
        assert error < 2e-2, (fp8, error)
