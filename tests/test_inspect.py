"""Inspection: explain on a simulated mesh, graphs per pass (golden), dumps, diffs, the HTML page."""

import inspect
import re
import shutil
import subprocess
import time

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import para_fx
from para_fx.inspect.report import Report, format_bytes
from para_fx.testing import dits
import ranks


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every explain compiles the same forward again: keep Dynamo's recompile limit out of the way."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_dit(batch=1):
    """One block, 2 heads of 16, a 3x5 patch grid: 15 tokens, split unevenly (8/7) over 2 ranks."""
    return dits.patch_dit(batch=batch, height=6, width=10, dim=32, num_heads=2, depth=1)


class CumsumBlock(nn.Module):
    """Self-attention, then a cumulative sum over the tokens: an op the shard pass cannot split."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D)
        return x + torch.cumsum(x, dim=1)  # CUMSUM_LINE


class CumsumModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([CumsumBlock(), CumsumBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def cumsum_model():
    torch.manual_seed(0)
    return CumsumModel().eval(), {"x": torch.randn(1, 15, 32)}


class LogSumExpBlock(CumsumBlock):
    """Attention whose log-sum-exp is read: context parallelism does not split it, so its q/k/v are gathered."""

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)  # LSE_LINE
        return x + out.transpose(1, 2).reshape(B, S, D) * lse.mean()


def log_sum_exp_model():
    torch.manual_seed(0)
    model = CumsumModel()
    model.blocks = nn.ModuleList([LogSumExpBlock(), LogSumExpBlock()])
    return model.eval(), {"x": torch.randn(1, 15, 32)}


def attention_lines(report: Report, pass_name: str) -> str:
    """What the attention module itself made (not its linear layers), one line per node; of the
    context-parallel attention's internals, only the collectives."""
    rows = [r for r in report.passes()[pass_name].rows if r.module == "blocks.0.attn"]
    lines = [r.line() for r in rows if r.placement or r.collective or pass_name == "captured"]
    return "\n".join(re.sub(r"'[^']*'\)  #", "group)  #", line) for line in lines)  # group names vary by process


class TestGraphsPerPass(expecttest.TestCase):
    def test_attention_graph_after_each_pass(self):
        model, kwargs = tiny_dit(batch=2)
        report = para_fx.explain(model, kwargs=kwargs, world_size=4, batch=2, ulysses=2)
        self.assertEqual(list(report.graphs), ["captured", "shard_batch", "shard_seq"])
        self.assertExpectedInline(attention_lines(report, "captured"), """\
view_3 = aten.view(view_2, [2, 15, 3, 2, 16])  # f32[2, 15, 3, 2, 16]  blocks.0.attn
permute = aten.permute(view_3, [2, 0, 3, 1, 4])  # f32[3, 2, 2, 15, 16]  blocks.0.attn
select = aten.select.int(permute, 0, 0)  # f32[2, 2, 15, 16]  blocks.0.attn
select_1 = aten.select.int(permute, 0, 1)  # f32[2, 2, 15, 16]  blocks.0.attn
select_2 = aten.select.int(permute, 0, 2)  # f32[2, 2, 15, 16]  blocks.0.attn
_scaled_dot_product_flash_attention_for_cpu = aten._scaled_dot_product_flash_attention_for_cpu(select, select_1, select_2)  # (f32[2, 2, 15, 16], f32[2, 2, 15])  blocks.0.attn
getitem_9 = getitem(_scaled_dot_product_flash_attention_for_cpu, 0)  # f32[2, 2, 15, 16]  blocks.0.attn
transpose_1 = aten.transpose.int(getitem_9, 1, 2)  # f32[2, 15, 2, 16]  blocks.0.attn
view_4 = aten.view(transpose_1, [2, 15, 32])  # f32[2, 15, 32]  blocks.0.attn""")
        self.assertExpectedInline(attention_lines(report, "shard_batch"), """\
view_3 = aten.view(view_2, [1, 15, 3, 2, 16])  # f32[1, 15, 3, 2, 16]  S(0)  blocks.0.attn
permute_6 = aten.permute(view_3, [2, 0, 3, 1, 4])  # f32[3, 1, 2, 15, 16]  S(1)  blocks.0.attn
select = aten.select.int(permute_6, 0, 0)  # f32[1, 2, 15, 16]  S(0)  blocks.0.attn
select_1 = aten.select.int(permute_6, 0, 1)  # f32[1, 2, 15, 16]  S(0)  blocks.0.attn
select_2 = aten.select.int(permute_6, 0, 2)  # f32[1, 2, 15, 16]  S(0)  blocks.0.attn
_scaled_dot_product_flash_attention_for_cpu = aten._scaled_dot_product_flash_attention_for_cpu(select, select_1, select_2)  # (f32[1, 2, 15, 16], f32[1, 2, 15])  [S(0), S(0)]  blocks.0.attn
getitem_7 = getitem(_scaled_dot_product_flash_attention_for_cpu, 0)  # f32[1, 2, 15, 16]  S(0)  blocks.0.attn
transpose_1 = aten.transpose.int(getitem_7, 1, 2)  # f32[1, 15, 2, 16]  S(0)  blocks.0.attn
view_4 = aten.view(transpose_1, [1, 15, 32])  # f32[1, 15, 32]  S(0)  blocks.0.attn""")
        self.assertExpectedInline(attention_lines(report, "shard_seq"), """\
view_3 = aten.view(view_2, [1, 8, 3, 2, 16])  # f32[1, 8, 3, 2, 16]  S(1)  blocks.0.attn
permute_10 = aten.permute(view_3, [2, 0, 3, 1, 4])  # f32[3, 1, 2, 8, 16]  S(3)  blocks.0.attn
select = aten.select.int(permute_10, 0, 0)  # f32[1, 2, 8, 16]  S(2)  blocks.0.attn
select_1 = aten.select.int(permute_10, 0, 1)  # f32[1, 2, 8, 16]  S(2)  blocks.0.attn
select_2 = aten.select.int(permute_10, 0, 2)  # f32[1, 2, 8, 16]  S(2)  blocks.0.attn
all_to_all_single = _c10d_functional.all_to_all_single(clone_1, [1, 1], [1, 1], group)  # f32[2, 1, 1, 8, 16]  blocks.0.attn
all_to_all_single_1 = _c10d_functional.all_to_all_single(clone_2, [1, 1], [1, 1], group)  # f32[2, 2, 1, 1, 8, 16]  blocks.0.attn
all_to_all_single_2 = _c10d_functional.all_to_all_single(stack_1, [1, 1], [1, 1], group)  # f32[2, 1, 1, 8, 16]  blocks.0.attn
transpose_1 = aten.transpose.int(permute_15, 1, 2)  # f32[1, 8, 2, 16]  S(1)  blocks.0.attn
view_7 = aten.view(transpose_1, [1, 8, 32])  # f32[1, 8, 32]  S(1)  blocks.0.attn""")


def test_report_sites_fallbacks_collectives_and_summary():
    model, kwargs = cumsum_model()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, ulysses=2)
    assert report.blocks == ["blocks.0", "blocks.1"]
    assert [(s.module, s.strategy, s.local_query_len, s.global_query_len) for s in report.attention_sites] == [
        ("blocks.0", "ulysses", 8, 15),
        ("blocks.1", "ulysses", 8, 15),
    ]
    line = next(i for i, text in enumerate(inspect.getsource(CumsumBlock).splitlines()) if "CUMSUM_LINE" in text)
    source = f"{__file__}:{inspect.getsourcelines(CumsumBlock)[1] + line}  return x + torch.cumsum(x, dim=1)  # CUMSUM_LINE"
    assert [(f.module, f.op, f.source) for f in report.fallbacks] == [
        ("blocks.0", "aten.cumsum.default", source),
        ("blocks.1", "aten.cumsum.default", source),
    ]
    assert "no sharding rule" in report.fallbacks[0].reason
    kinds = [(c.kind, c.module, c.site) for c in report.collectives]
    # each attention: all-to-alls of q, of k and v together, of the output; each cumsum gathers its input
    assert kinds.count(("all_to_all_single", "blocks.0", 0)) == 3
    assert kinds.count(("all_to_all_single", "blocks.1", 1)) == 3
    assert ("all_gather_into_tensor", "blocks.0", None) in kinds
    text = str(report)
    assert "all_to_all_single x3" in text
    assert "aten.cumsum.default" in text and "CUMSUM_LINE" in text
    assert "FLOPs sharded (estimate)" in text and "over 2 ranks" in text
    summary = dict(report.summary())
    assert summary["fallbacks"] == "2 inside the transformer blocks, 2 in all"
    needed = sum(c.bytes for c in report.collectives if c.site is not None)
    total = sum(c.bytes for c in report.collectives)
    assert total > needed > 0  # the cumsum gathers on top of the attention's all-to-alls
    assert f"({total / needed:.2f}x)" in summary["communication against the minimum"]


def test_verdict_names_each_cause_once_with_its_line_and_what_to_do():
    model, kwargs = cumsum_model()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, ulysses=2)
    verdict = report.verdict()
    assert verdict[0] == "parallel: yes, all 2 attention sites split the tokens over the ranks (ulysses)"
    assert verdict[1] == "what keeps work whole on every rank (1 cause, costliest first):"  # two fallbacks, one cause
    assert verdict[2] == "1. aten.cumsum.default: no sharding rule for aten.cumsum.default"
    assert "CUMSUM_LINE" in verdict[3] and verdict[3].strip().startswith("at ")
    assert verdict[4].strip() == "in blocks.0, blocks.1 (2 times; inside the transformer blocks: it costs in every block)"
    assert verdict[5].strip().startswith("what to do: ")
    moved, needed = report.communication()
    assert verdict[6].startswith(f"communication per step: {format_bytes(moved)}, {moved / needed:.2f}x the {format_bytes(needed)}")
    fallbacks = next(t for t in report.tables() if t.title.startswith("fallbacks"))
    assert [row[3:] for row in fallbacks.rows] == [["2", "blocks.0, blocks.1"]]  # grouped: times, modules


def test_attention_that_runs_whole_is_flagged_and_the_flops_caveat_given():
    model, kwargs = log_sum_exp_model()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, ulysses=2)
    assert report.verdict()[0] == "parallel: no, none of the 2 attention sites splits the tokens: every rank computes every attention whole"
    (cause,) = report.causes()
    assert "the attention's log-sum-exp is used" in cause.what and "LSE_LINE" in cause.source
    assert "log-sum-exp" in cause.advice
    sites = next(t for t in report.tables() if t.title.startswith("attention sites"))
    assert sites.title == "attention sites (2, 0 split over the ranks)"
    for row in sites.rows:
        assert row[1] == "replicated" and "S(2)" in row[3]
        assert row[5] == "q/k/v gathered: the attention's log-sum-exp is used"
    summary = dict(report.summary())
    assert summary["FLOPs sharded (estimate)"].endswith("(matmuls only: no attention is split)")


def test_report_says_what_was_explained():
    model, kwargs = tiny_dit()
    text = str(para_fx.explain(model, kwargs=kwargs, world_size=4, ring=2, rank=3))
    first, second = text.splitlines()[:2]
    assert first == (
        f"model: PatchDiT on rank 3 of 4 (batch 1 x ring 2 x ulysses 2, simulated); "
        f"torch {torch.__version__}, para-fx {para_fx.__version__}"
    )
    assert second.startswith("inputs: x f32[1, 4, 6, 10], timestep f32[1]")
    torch._dynamo.reset()
    assert para_fx.explain(model, kwargs=kwargs).verdict()[0].startswith("parallel: no, one device")


def test_dump_dir_writes_every_pass_and_diffs(tmp_path, monkeypatch):
    monkeypatch.setenv("PARA_FX_DUMP_DIR", str(tmp_path))
    model, kwargs = tiny_dit()
    para_fx.explain(model, kwargs=kwargs, world_size=2, ring=2)
    assert [p.name for p in tmp_path.iterdir()] == ["rank0"]  # the simulated rank, as on a real mesh
    tmp_path = tmp_path / "rank0"
    files = sorted(p.name for p in tmp_path.iterdir())
    graph = files[0].split(".")[0]
    assert files == [f"{graph}.0.captured.py", f"{graph}.1.shard_seq.diff", f"{graph}.1.shard_seq.py"]
    code = (tmp_path / f"{graph}.1.shard_seq.py").read_text()
    assert "_c10d_functional.all_to_all_single(" in code and "S(1)" in code
    diff = (tmp_path / f"{graph}.1.shard_seq.diff").read_text()
    assert diff.startswith(f"--- {graph} captured\n+++ {graph} shard_seq\n")
    assert "+_c10d_functional.all_to_all_single" in diff
    assert "-aten.addmm  f32[15, 96]  blocks.0.attn.qkv" in diff and "+aten.addmm  f32[8, 96]  blocks.0.attn.qkv" in diff


def test_first_block_cache_section():
    model, kwargs = dits.patch_dit(height=6, width=10, dim=32, num_heads=2, depth=2, batch=1)
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, ulysses=2, cache=para_fx.FirstBlockCache(0.08))
    assert report.cache is not None
    assert list(report.graphs) == ["captured", "shard_seq", "cache"]
    assert "first block cache (one torch.cond per step; 1 of 2 blocks skippable):" in str(report)


def test_html_is_self_contained(tmp_path):
    model, kwargs = cumsum_model()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, ulysses=2)
    path = tmp_path / "report.html"
    report.save_html(str(path))
    page = path.read_text()
    for needle in ("<h2>attention sites (2, 2 split over the ranks)</h2>", "aten.cumsum.default", 'class="coll"', 'class="ps"', "diff from captured"):
        assert needle in page
    for external in ("src=", "href=", "<script", "@import", "url("):
        assert external not in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (manual check: chromium --headless --dump-dom report.html)")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h2>fallbacks (2; 2 inside the blocks, listed first)</h2>" in dom.stdout and "all_to_all_single" in dom.stdout
    # the verdict comes first, its cause once with the model's line, and the placements have a legend
    verdict = dom.stdout.index('<div class="verdict">')
    assert verdict < dom.stdout.index("<h2>blocks (2)</h2>")
    assert dom.stdout.count("CUMSUM_LINE", verdict, dom.stdout.index("<h2>blocks (2)</h2>")) == 1
    assert "placements: R replicated" in dom.stdout


def nodes(report: Report, pass_name: str) -> list[tuple[str, str, str, str]]:
    """Each node's op, value, placement and module: the graph without names (process-group names differ)."""
    return [(r.op, r.value, r.placement, r.module) for r in report.passes()[pass_name].rows]


def real_mesh_report():
    model, kwargs = tiny_dit()
    report = para_fx.explain(model, kwargs=kwargs, mesh=para_fx.init_mesh(ulysses=2, ring=2))
    return str(report), nodes(report, "shard_seq")


ranks.add(4, "inspect real mesh report", real_mesh_report)


@pytest.mark.ranks
def test_simulated_mesh_matches_four_real_ranks():
    """What makes the in-process structure tests trustworthy: the simulated rank 0 reports what a real one does."""
    model, kwargs = tiny_dit()
    simulated = para_fx.explain(model, kwargs=kwargs, world_size=4, ulysses=2, ring=2)
    assert not torch.distributed.is_initialized()  # the fake process group was torn down
    text, graph = ranks.result(4, "inspect real mesh report")[0]
    assert str(simulated) == text.replace("ulysses 2);", "ulysses 2, simulated);", 1)  # the one difference
    assert "hybrid" in text
    assert nodes(simulated, "shard_seq") == graph


def test_explain_asks_for_world_size_without_process_group():
    model, kwargs = tiny_dit()
    with pytest.raises(ValueError, match="world_size"):
        para_fx.explain(model, kwargs=kwargs, ulysses=2)


def test_compile_seconds_name_each_step_and_stay_out_of_the_text():
    model, kwargs = tiny_dit()
    torch._dynamo.reset()
    started = time.perf_counter()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, ulysses=2)
    wall = time.perf_counter() - started
    seconds = report.compile_seconds()
    assert set(seconds) == {"captured", "shard_seq", "inner compiler"}, seconds
    assert all(s >= 0 for s in seconds.values()) and seconds["captured"] > 0 and seconds["shard_seq"] > 0
    assert sum(seconds.values()) < wall  # Dynamo's tracing comes on top
    assert "seconds" not in str(report)  # the text compares equal between runs and ranks


def test_graph_inputs_carry_the_models_names():
    model, kwargs = tiny_dit()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, ulysses=2)
    for name in ("captured", "shard_seq"):
        inputs = [r.name for r in report.passes()[name].rows if r.op == "placeholder"]
        assert "x" in inputs and "blocks_0_attn_qkv_weight" in inputs, inputs
        assert not any(re.fullmatch(r"arg\d+_\d+", n) for n in inputs), inputs


def test_explain_meshes_gives_the_reports_of_one_explain_per_mesh():
    """``explain_meshes`` (Dynamo traces the model once, the backend runs once per mesh; the
    structure tests read their meshes so) reports what ``explain`` on each mesh does, field by field:
    a batch split, Ring, a hybrid mesh, and a rank other than 0."""
    from para_fx.inspect.explain import explain_meshes

    model, kwargs = tiny_dit(batch=2)
    meshes = [dict(world_size=2, batch=2), dict(world_size=2, ring=2, rank=1), dict(world_size=4, ring=2, ulysses=2)]
    torch._dynamo.reset()
    shared = explain_meshes(model, meshes, kwargs=kwargs)
    for degrees, report in zip(meshes, shared):
        torch._dynamo.reset()
        alone = para_fx.explain(model, kwargs=kwargs, **degrees)
        assert str(report) == str(alone) and report.graphs == alone.graphs, degrees
        for field in ("attention_sites", "fallbacks", "collectives", "notes", "blocks", "graph_count", "world_size", "context"):
            assert getattr(report, field) == getattr(alone, field), (degrees, field)
    torch._dynamo.reset()
    assert [r.context.rank for r in shared] == [0, 1, 0] and "hybrid" in str(shared[2])
