"""The shard pass on tiny diffusers transformers and plain DiTs.

Structure (one graph, every attention split, no fallback or gather inside the blocks) is read
in-process from ``explain`` on a simulated mesh, as rank 0: it holds the largest chunks, and a rank
whose graph differed in a gather or a fallback would send collectives the others do not, which
the numeric tier would see fail. Outputs are compared with single-process eager on every real
gloo rank, every model and mesh in the one spawn per world size of tests/ranks.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import para_fx
from para_fx.adapters.traceable import make_traceable
from para_fx.core.mesh import MeshInfo
from para_fx.core.placement import Shard, plain
from para_fx.inspect.explain import explain_meshes
from para_fx.passes.shard import ShardSpec, find_demand, plan
from para_fx.passes.shard_rules import Group
from para_fx.testing import dits, zoo
from para_fx.testing.dits import first_tensor
import ranks

FACTORIES = {**zoo.FACTORIES, **dits.FACTORIES}
ALL = ["flux", "hunyuan_video", "mochi", "cogvideox", "wan", "sd3", "qwen_image", "patch_dit", "joint_dit"]
# batch 2 (the CFG batch) through projections on flattened [B*S, D] rows; complex rotary embeddings
BATCH_TWO = ["row_dit", "complex_rope_dit", "pixart", "dit"]

# (batch, ring, ulysses) -> the models run on that mesh
MESHES = {
    (1, 1, 2): ALL + BATCH_TWO,
    (1, 2, 1): ["flux", "wan", "joint_dit", "patch_dit", "fp8_patch_dit", "row_dit"],
    (2, 1, 1): ["patch_dit"],
    # SD3, CogVideoX and Qwen-Image join text and image tokens into one attention as the joint DiT and
    # FLUX do: on the hybrid mesh those two stand for them (structure here, FLUX's outputs on real
    # ranks, see ELSEWHERE); theirs are read on Ulysses 2, where their outputs are checked too
    (1, 2, 2): ["flux", "hunyuan_video", "joint_dit", *BATCH_TWO],
    (1, 4, 1): ["wan", "patch_dit"],
    (2, 1, 2): ["patch_dit"],
}
CASES = [(mesh_shape, name) for mesh_shape, names in MESHES.items() for name in names]


def world_of(mesh_shape):
    return mesh_shape[0] * mesh_shape[1] * mesh_shape[2]


def model_and_inputs(name, **overrides):
    torch.manual_seed(0)
    model, kwargs = FACTORIES[name](**overrides)
    make_traceable(model)  # Mochi's per-sample attention loop as one masked SDPA: one graph
    return model, kwargs


# --- structure, in-process ------------------------------------------------------------------------


# On Ulysses 2 the models of ALL run at batch 2, the CFG batch: the structure checks below and
# every self-attention context parallel. Their batch-1 structure is read on the other meshes (Mochi,
# on Ulysses 2 only, is checked at batch 1 by its outputs on real ranks).
CFG_BATCH_MESH = (1, 1, 2)


# Where the structure is read, the inlining of the shard pass's helpers is also compared with a
# whole trace (test_inlining_a_passs_helpers_gives_the_graph_a_whole_trace_gives): one explain for both.
INLINING_CHECKED = {((1, 2, 1), "flux"), (CFG_BATCH_MESH, "hunyuan_video")}


@pytest.mark.parametrize("mesh_shape, name", sorted(INLINING_CHECKED), ids=ranks.mesh_id)
def test_structure_on_a_simulated_mesh(monkeypatch, mesh_shape, name):
    cfg_batch = mesh_shape == CFG_BATCH_MESH and name in ALL
    model, kwargs = model_and_inputs(name, **(dict(batch=2) if cfg_batch else {}))
    batch, ring, ulysses = mesh_shape
    compared = compare_inlining(monkeypatch)
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=world_of(mesh_shape), batch=batch, ring=ring, ulysses=ulysses)
    torch._dynamo.reset()
    assert_inlined_as_traced(compared)
    assert_structure(report, name, mesh_shape, kwargs, cfg_batch)


def assert_structure(report, name, mesh_shape, kwargs, cfg_batch):
    _, ring, ulysses = mesh_shape
    where = f"{name} mesh {mesh_shape}"
    assert report.graph_count == 1, f"{where}: {report.graph_count} graphs (code between graphs runs unsharded)"
    inside = [(f.module, f.op, f.reason, f.source) for f in report.fallbacks if "blocks." in f.module]
    assert not inside, f"{where}: fallback inside the transformer blocks: {inside}"
    # all-to-alls are emitted only by attention and all-reduces only for reductions, so
    # a gather inside the blocks would be a fallback or a reshard.
    gathers = [c.module for c in report.collectives if c.kind.startswith("all_gather") and "blocks." in c.module]
    assert not gathers, f"{where}: all-gathers inside the transformer blocks: {gathers}"
    seq = ring * ulysses
    if seq > 1:
        sites = [(s.module, s.strategy, s.local_query_len, s.global_query_len) for s in report.attention_sites]
        parallel = [s for s in sites if s[1] in ("ulysses", "ring", "hybrid", "local")]
        assert parallel, f"{where}: no attention site was sharded: {sites}"
        for module, strategy, local, total in parallel:
            assert local <= total // seq + 2, f"{where}: {module} keeps {local} of {total} query tokens"
    if cfg_batch or (name in BATCH_TWO and mesh_shape in BATCH_TWO_MESHES):  # the batch-2 check below, on this report
        assert next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).shape[0] == 2
        assert_self_attention_context_parallel(report, mesh_shape)


def assert_self_attention_context_parallel(report, mesh_shape):
    """A "local" self-attention (keys and values left whole) would be correct but no faster: at
    batch 2 the keys and values must follow the queries through the [B*S, D] rows of to_k and
    to_v. Cross-attention to the text (diffusers' attn2, where it is not SD3's second
    self-attention) is local by design."""
    _, ring, ulysses = mesh_shape
    expected = "ulysses" if ring == 1 else "ring" if ulysses == 1 else "hybrid"
    sites = [(s.module, s.strategy) for s in report.attention_sites if "blocks." in s.module]
    cross_attention = lambda module, strategy: module.endswith("attn2") and strategy == "local"
    assert sites and all(strategy == expected or cross_attention(module, strategy) for module, strategy in sites), sites
    assert all("blocks." not in f.module for f in report.fallbacks), report.fallbacks
    assert all("blocks." not in c.module for c in report.collectives if c.kind.startswith("all_gather")), report.collectives


BATCH_TWO_MESHES = [(1, 1, 2), (1, 2, 1), (1, 1, 4), (1, 2, 2)]
# the models at batch 2 (their default) on each mesh; where the structure of CASES is read on the
# same model and mesh, the strategies are checked on that report
BATCH_TWO_ONLY = [(mesh_shape, name) for mesh_shape in BATCH_TWO_MESHES for name in BATCH_TWO if (mesh_shape, name) not in CASES]

# Each model's inputs (at batch 2 on CFG_BATCH_MESH for the models of ALL) -> the meshes its
# structure is read on: Dynamo traces it once for all of them (explain_meshes gives the reports of
# one explain per mesh: tests/test_inspect.py; 45-55% of their CPU time on these models)
MESH_GROUPS: dict[tuple[str, bool], list[tuple[int, int, int]]] = {}
for _mesh_shape, _name in [*CASES, *BATCH_TWO_ONLY]:
    if (_mesh_shape, _name) not in INLINING_CHECKED:
        MESH_GROUPS.setdefault((_name, _mesh_shape == CFG_BATCH_MESH and _name in ALL), []).append(_mesh_shape)


@pytest.mark.parametrize("name, cfg_batch", list(MESH_GROUPS), ids=lambda v: {True: "cfg_batch_2", False: "default_inputs"}.get(v, v))
def test_structure_on_simulated_meshes(name, cfg_batch):
    """Every mesh of CASES: one graph, no fallback or gather inside the blocks, every attention
    split; BATCH_TWO_ONLY's: every self-attention context parallel at batch 2."""
    meshes = MESH_GROUPS[name, cfg_batch]
    model, kwargs = model_and_inputs(name, **(dict(batch=2) if cfg_batch else {}))
    degrees = [dict(world_size=world_of(m), batch=m[0], ring=m[1], ulysses=m[2]) for m in meshes]
    torch._dynamo.reset()
    reports = explain_meshes(model, degrees, kwargs=kwargs)
    torch._dynamo.reset()
    for mesh_shape, report in zip(meshes, reports):
        if (mesh_shape, name) in CASES:
            assert_structure(report, name, mesh_shape, kwargs, cfg_batch)
        else:
            assert next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).shape[0] == 2
            assert_self_attention_context_parallel(report, mesh_shape)


def test_linear_attention_runs_on_split_tokens_with_one_all_reduce():
    """Linear attention sums over the tokens in one matmul (keys against values padded with ones):
    on split tokens that sum is partial on every rank, and one all-reduce of its small
    [B, H, Dh, Dh + 1] result is the block's whole exchange; no gather of the tokens."""
    model, kwargs = model_and_inputs("linear_attention_dit")
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    torch._dynamo.reset()
    assert report.graph_count == 1
    assert [s.module for s in report.attention_sites] == ["blocks.0.attn"]  # the softmax block
    in_linear_block = [(c.kind, c.bytes) for c in report.collectives if c.module.startswith("blocks.1.")]
    assert in_linear_block == [("all_reduce", 2 * 4 * 16 * 17 * 4)], in_linear_block  # fp32 [B, H, Dh, Dh + 1]
    assert not [f for f in report.fallbacks if "blocks." in f.module], report.fallbacks


def test_demand_splits_flattened_rows_by_sequence_not_by_batch():
    """[B*S, D] rows flow into [B, S, H, Dh] queries: the rows are demanded split by sequence
    within each sample (((S, 1),) * B); a plain split of B*S would be the batch halves."""

    def attention(x, wq, wk):
        B, S, D = x.shape
        rows = x.reshape(B * S, D)
        q = (rows @ wq).view(B, S, 2, D // 2).transpose(1, 2)
        k = (rows @ wk).view(B, S, 2, D // 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, k)

    gm = make_fx(attention, tracing_mode="fake")(torch.randn(2, 7, 8), torch.randn(8, 8), torch.randn(8, 8))
    info = MeshInfo(1, 1, 2, 0, 0, 0, "batch", "ring", "ulysses", "seq")
    spec = ShardSpec("seq", Group(2, 0, "unused"), info)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    (rows,) = x.users
    demand = find_demand(gm.graph, spec)
    assert demand[x] == Shard(1, plain(7))
    assert tuple(rows.meta["val"].shape) == (14, 8) and demand[rows] == Shard(0, plain(7) * 2)
    (site,) = plan(gm, spec).sites.values()
    assert site.strategy == "ulysses", site  # the key rows are split like the query rows


def test_batch_parallel_only_gathers_outputs():
    model, kwargs = dits.patch_dit()
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, batch=2)
    torch._dynamo.reset()
    assert [c.kind for c in report.collectives] == ["all_gather_into_tensor"], str(report)


# --- outputs, on real ranks -----------------------------------------------------------------------


# On the ranks each model has one block of each kind (the first and the last where they differ:
# SD3's and Mochi's last block returns no text stream; the linear-attention DiT's first block is
# softmax): every block kind's arithmetic on split tokens, at about half the compile time of the
# two-per-kind configs. The structure between two blocks of one kind (no gather or fallback at
# their boundary) is read above, in-process, on the full configs.
ONE_BLOCK = {
    "flux": dict(num_layers=1, num_single_layers=1),
    "hunyuan_video": dict(num_layers=1, num_single_layers=1, num_refiner_layers=1),
    "wan": dict(num_layers=1),
    "cogvideox": dict(num_layers=1),
    "qwen_image": dict(num_layers=1),
    "pixart": dict(num_layers=1),
    "dit": dict(num_layers=1),
    "patch_dit": dict(depth=1),
    "fp8_patch_dit": dict(depth=1),
    "joint_dit": dict(depth=1),
    "row_dit": dict(depth=1),
    "complex_rope_dit": dict(depth=1),
}


def compiled_error(mesh_shape, name):
    """On one rank: max abs error of the model compiled with the para backend against eager. The
    sharded graph runs as the passes leave it (``compiler="eager"``): these cases check the passes'
    arithmetic; AOTAutograd and Inductor on the sharded graphs run in the pipelines, the examples
    and the GPU tier."""
    mesh = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
    model, kwargs = model_and_inputs(name, **ONE_BLOCK.get(name, {}))
    with torch.no_grad():
        expected = first_tensor(model(**kwargs))
        compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager"))
        return (first_tensor(compiled(**kwargs)) - expected).abs().max().item()


# Outputs checked elsewhere, not run again here: FLUX on Ulysses 2 (examples/demo.py through
# aot_eager, tests/test_quiet.py; examples/usage.py, the same on CPU, tests/test_readme.py); FLUX on
# the hybrid 1x2x2 mesh (every step of a cached trajectory against one process, tests/test_cache.py).
# SD3, CogVideoX and Qwen-Image on 1x2x2: see MESHES (FLUX's outputs there, above, stand for their
# joint text and image attention, as the joint DiT's structure does). HunyuanVideo on
# 1x2x2 (its 4 ranks cost the most of any case): its masked joint attention runs on Ulysses 2 here
# and on Ring 2 in its pipeline (tests/test_pipelines.py), masked keys on the hybrid mesh in
# tests/test_attention.py, its structure on 1x2x2 above. The joint DiT on Ring 2: the first call of
# "shard new resolutions" below. On 4 ranks, where each case costs its compile four times: the
# diffusers DiT on 1x2x2 is made of the same blocks as PixArt, which runs there (the structure of
# both is read above); the complex rotary embedding acts on each rank's tokens before the attention,
# whatever the mesh (on Ulysses 2 here; the hybrid mesh's attention with the other batch-2 models);
# the patch DiT on the uneven Ring 4 is Wan's case there with plain blocks (on Ring 2 and both batch
# meshes here); the joint DiT on 1x2x2 is FLUX's joint attention there with plain blocks (FLUX's
# cached trajectory above; the joint DiT's structure is read on 1x2x2 above, its outputs on Ulysses
# 2 here). Wan on Ulysses 2: its pipeline (tests/test_pipelines.py) runs the same tiny transformer
# at batch 1 there, with two blocks, every step against one process.
ELSEWHERE = {
    ((1, 1, 2), "flux"), ((1, 2, 2), "flux"), ((1, 2, 2), "hunyuan_video"), ((1, 2, 1), "joint_dit"),
    ((1, 2, 2), "dit"), ((1, 2, 2), "complex_rope_dit"), ((1, 4, 1), "patch_dit"), ((1, 1, 2), "wan"),
    ((1, 2, 2), "joint_dit"),
}
NUMERIC_CASES = [case for case in CASES if case not in ELSEWHERE] + [((1, 1, 2), "linear_attention_dit")]
for _mesh_shape, _name in NUMERIC_CASES:
    ranks.add(world_of(_mesh_shape), f"shard {ranks.mesh_id(_mesh_shape)} {_name}", compiled_error, _mesh_shape, _name)


@pytest.mark.ranks
@pytest.mark.parametrize("mesh_shape, name", NUMERIC_CASES, ids=ranks.mesh_id)
def test_outputs_match_single_process(mesh_shape, name):
    errors = ranks.result(world_of(mesh_shape), f"shard {ranks.mesh_id(mesh_shape)} {name}")
    assert max(errors) <= 1e-4, f"{name} mesh {mesh_shape}: max abs error per rank {errors}"


def new_resolutions():
    mesh = para_fx.init_mesh(ring=2, ulysses=1)
    model, _ = dits.joint_dit(**ONE_BLOCK["joint_dit"])
    compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager"))
    errors = []
    with torch.no_grad():
        for height in (14, 10, 14):  # a new resolution, then the first again
            _, kwargs = dits.joint_dit(height=height)
            errors.append((compiled(**kwargs) - model(**kwargs)).abs().max().item())
    return errors


ranks.add(2, "shard new resolutions", new_resolutions)


@pytest.mark.ranks
def test_new_resolution_on_two_ranks():
    for errors in ranks.result(2, "shard new resolutions"):
        assert len(errors) == 3 and max(errors) <= 1e-4, errors


class PaddedSequences(torch.nn.Module):
    """Samples of different lengths projected as one token list, then padded into a batch, as
    Z-Image does: ``pad_sequence`` copies each sample into a zero buffer inside its kernel, which
    ``functionalize`` does not see, so the capture has to remove those writes itself."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, first, second):
        qkv = self.qkv(torch.cat([first, second]))
        padded = torch.nn.utils.rnn.pad_sequence(qkv.split([len(first), len(second)]), batch_first=True)
        q, k, v = padded.unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def padded_sequences():
    torch.manual_seed(0)
    return PaddedSequences(), (torch.randn(12, 8), torch.randn(9, 8))


def test_padded_sequences_are_captured_without_writes_and_split():
    model, inputs = padded_sequences()
    torch._dynamo.reset()
    report = para_fx.explain(model, args=inputs, world_size=2)
    torch._dynamo.reset()
    assert "aten.copy_." not in report.graphs["captured"], report.graphs["captured"]
    assert [s.strategy for s in report.attention_sites] == ["ulysses"] and not report.fallbacks, report


def test_a_write_no_other_op_reads_is_made_functional_without_a_second_trace(monkeypatch):
    """The CPU kernel of ``rms_norm`` adds eps in place to the mean it just computed, below
    ``functionalize``; nothing else reads that mean, so the capture rewrites the write as an
    out-of-place add instead of tracing the whole graph again."""
    from para_fx.core import capture

    traces = []
    real_trace = capture._trace
    monkeypatch.setattr(capture, "_trace", lambda *args: traces.append(1) or real_trace(*args))
    norm = torch.nn.RMSNorm(8, eps=1e-6)
    x = torch.randn(2, 5, 8)
    gm = torch.fx.symbolic_trace(norm)
    captured = capture.capture_aten(gm, [x])
    assert len(traces) == 1 and not capture._writes_in_place(captured), captured.code
    out = captured(x)
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, norm(x))


class WritesIntoViews(torch.nn.Module):
    """Wan's rotary embedding (even and odd features written into an ``empty_like``) and
    HunyuanVideo's mask (a column set to True)."""

    def forward(self, x, keep):
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 1::2] * 2
        out[..., 1::2] = x[..., 0::2] - 1
        mask = keep.clone()
        mask[:, 0] = True
        return out * mask[..., None]


class ReadsAViewAfterTheWrite(torch.nn.Module):
    """A view taken before the write and read after it sees the write: no scatter can stand for it."""

    def forward(self, x):
        buf = x * 1
        row = buf[:, 0]
        buf[:, 0] = 0.0
        return row + buf.sum()


@pytest.mark.parametrize("module, inputs, traces", [
    (WritesIntoViews(), (torch.randn(2, 5, 8), torch.rand(2, 5) > 0.5), 1),
    (ReadsAViewAfterTheWrite(), (torch.randn(3, 4),), 2),
], ids=["scatters", "functionalize"])
def test_writes_into_views_of_a_fresh_tensor_become_scatters_without_a_second_trace(monkeypatch, module, inputs, traces):
    """A copy or fill into a slice or select of a tensor the graph made becomes a scatter, with no
    second trace under ``functionalize``, unless a view taken before the write is read after it."""
    from para_fx.core import capture

    calls = []
    real_trace = capture._trace
    monkeypatch.setattr(capture, "_trace", lambda *args: calls.append(1) or real_trace(*args))
    graphs = []
    torch._dynamo.reset()
    torch.compile(module, backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    captured = capture.capture_aten(graphs[0], list(inputs))
    assert len(calls) == traces, captured.code
    assert not capture._writes_in_place(captured), captured.code
    out = captured(*inputs)
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, module(*inputs))


def test_a_write_to_an_input_is_traced_through_functionalize():
    """Writes to the graph's inputs become a functional op and one copy back at the end, which the
    passes keep; a graph that writes nothing is traced once, without ``functionalize``."""
    from para_fx.core import capture

    class AddsInPlace(torch.nn.Module):
        def forward(self, x):
            x.add_(1.0)
            return x * 2

    gm = torch.fx.symbolic_trace(AddsInPlace())
    captured = capture.capture_aten(gm, [torch.zeros(3)])
    ops = [str(n.target) for n in captured.graph.nodes if n.op == "call_function"]
    assert ops.index("aten.add.Tensor") < ops.index("aten.mul.Tensor") < ops.index("aten.copy_.default"), ops
    x = torch.zeros(3)
    out = captured(x)
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, torch.full((3,), 2.0)) and torch.equal(x, torch.ones(3))


def compare_inlining(monkeypatch):
    """From now on, each graph the backend inlines is also traced whole: the list gets (traced, inlined) per graph."""
    from para_fx.core import backend, capture

    compared = []
    inline = backend.inline_helpers

    def both(gm, example_inputs):
        inlined = inline(gm, example_inputs)
        compared.append((_nodes(capture.capture_aten(gm, example_inputs, functional=False)), _nodes(inlined)))
        return inlined

    monkeypatch.setattr(backend, "inline_helpers", both)
    return compared


def _nodes(gm):
    import operator
    import re

    rows = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        value = (tuple(v.shape), v.stride(), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__
        meta = {k: n.meta.get(k) for k in ("stack_trace", "nn_module_stack")}
        custom = n.meta.get("custom") if n.target is not operator.getitem else None
        rows.append(re.sub(r"getitem_\d+", "getitem", f"{n.format_node()} {value} {meta} {custom}"))
    return rows


def assert_inlined_as_traced(compared):
    assert len(compared) == 1
    traced, inlined = compared[0]
    assert inlined == traced


# Also on FLUX at 1x2x1 and HunyuanVideo at batch 2 on 1x1x2, in test_structure_on_a_simulated_mesh (INLINING_CHECKED).
@pytest.mark.parametrize("mesh_shape, name", [((2, 1, 1), "wan")], ids=ranks.mesh_id)
def test_inlining_a_passs_helpers_gives_the_graph_a_whole_trace_gives(monkeypatch, mesh_shape, name):
    """After the shard pass only its helpers are traced (the aten ops run on fake values): the
    graph equals the one a trace of the whole graph makes, node for node, with the same names,
    arguments, fake values and metadata. (``make_fx`` numbers the items of multi-output ops it
    unpacks and then drops; those names may differ.)"""
    compared = compare_inlining(monkeypatch)
    model, kwargs = model_and_inputs(name)
    torch._dynamo.reset()
    para_fx.explain(model, kwargs=kwargs, world_size=world_of(mesh_shape), batch=mesh_shape[0], ring=mesh_shape[1],
                    ulysses=mesh_shape[2])
    torch._dynamo.reset()
    assert_inlined_as_traced(compared)


class FlexAfterSdpa(torch.nn.Module):
    """An SDPA block, then a causal flex attention over a block mask. ``create_block_mask`` runs
    ``vmap``, which ``functionalize`` cannot trace through: the capture traces without it (nothing
    is written in place), and the flex attention runs Ulysses (tests/test_flex_attention.py)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.qkv_flex = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, 2, 8).permute(2, 0, 3, 1, 4)
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        q, k, v = self.qkv_flex(x).view(B, S, 3, 2, 8).permute(2, 0, 3, 1, 4)
        causal = create_block_mask(lambda b, h, q_index, kv_index: q_index >= kv_index, B, None, S, S, device=x.device)
        return self.out(flex_attention(q, k, v, block_mask=causal).transpose(1, 2).flatten(2))


def flex_after_sdpa():
    torch.manual_seed(0)
    return FlexAfterSdpa(), torch.randn(1, 256, 16)


def test_flex_attention_is_captured_and_split():
    model, x = flex_after_sdpa()
    torch._dynamo.reset()
    report = para_fx.explain(model, args=(x,), world_size=2)
    torch._dynamo.reset()
    assert report.graph_count == 1
    assert [s.strategy for s in report.attention_sites] == ["ulysses", "ulysses"], report.attention_sites
    assert report.fallbacks == []


def flex_after_sdpa_error():
    model, x = flex_after_sdpa()
    compiled = torch.compile(model, backend=para_fx.backend(mesh=para_fx.init_mesh(), compiler="aot_eager"))
    with torch.no_grad():
        return (compiled(x) - model(x)).abs().max().item()


ranks.add(2, "shard flex attention", flex_after_sdpa_error)


@pytest.mark.ranks
def test_flex_attention_is_right_on_two_ranks():
    errors = ranks.result(2, "shard flex attention")
    assert max(errors) <= 1e-5, errors


def padded_sequences_error():
    model, inputs = padded_sequences()
    compiled = torch.compile(model, backend=para_fx.backend(mesh=para_fx.init_mesh(), compiler="eager"))
    with torch.no_grad():
        return (compiled(*inputs) - model(*inputs)).abs().max().item()


ranks.add(2, "shard padded sequences", padded_sequences_error)


@pytest.mark.ranks
def test_padded_sequences_match_single_process():
    """On real ranks: the shards of the padded buffer hold the copied tokens (they held zeros)."""
    errors = ranks.result(2, "shard padded sequences")
    assert max(errors) <= 1e-5, errors
