"""Grouped-query and causal attention split over the ranks (Ulysses, Ring and both), against one process.

Ranks are spawned once per world size; every mesh and case runs inside, and each case's result (an
error, or the exception it raised) is checked on its own.
"""

import traceback

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import para_fx
import ranks
from para_fx.core.mesh import mesh_info
from para_fx.inspect.explain import explain_meshes
from para_fx.core.placement import local_ranges, plain
from para_fx.runtime.attention import sharded_attention

TOKENS = 13  # not divisible by 2 or 4: uneven chunks


class Block(nn.Module):
    """Pre-norm attention + MLP. ``kv_heads < heads`` is grouped-query attention; ``memory`` given:
    keys/values come from it (a replicated input) rather than from the tokens."""

    def __init__(self, dim: int, heads: int, kv_heads: int, causal: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, dim // heads, causal
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, memory=None):
        B, S, D = x.shape
        h = self.norm(x)
        source = h if memory is None else memory
        q = self.to_q(h).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(source).view(B, source.shape[1], 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.kv_heads != self.heads)
        x = x + self.proj(out.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(x)


class TinyDiT(nn.Module):
    def __init__(self, heads: int, kv_heads: int, causal: bool, dim: int = 48, depth: int = 2, channels: int = 6):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, kv_heads, causal) for _ in range(depth)])
        self.out = nn.Linear(dim, channels)

    def forward(self, x, memory=None):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, memory)
        return self.out(x)


# name -> (heads, kv_heads, causal, keys/values from a replicated input)
MODELS = {
    "gqa": (4, 2, False, False),
    "mqa": (4, 1, False, False),  # one key/value head: fewer than the Ulysses degree, so it is replicated
    "gqa_6_2": (6, 2, False, False),  # 3 query heads per rank at Ulysses 2: one whole group each
    "causal": (4, 4, True, False),
    "causal_gqa": (6, 2, True, False),
    "causal_memory": (4, 4, True, True),  # causal over keys/values that are not split
}


def make_model(name: str, batch: int = 1, depth: int = 2):
    heads, kv_heads, causal, memory = MODELS[name]
    torch.manual_seed(0)
    model = TinyDiT(heads, kv_heads, causal, depth=depth).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = dict(x=torch.randn(batch, TOKENS, 6, generator=g))
    if memory:
        kwargs["memory"] = torch.randn(batch, 11, 48, generator=g)
    return model, kwargs


# (query tokens, key/value tokens, heads, key/value heads, causal, query/key layout: segments of the sequence)
KERNEL_CASES = [
    (13, 13, 4, 2, False, None),
    (13, 13, 4, 1, False, None),
    (13, 13, 6, 2, False, None),  # 4 ranks: query runs cross groups, so key/value heads are repeated
    (13, 13, 3, 1, False, None),  # heads padded to the Ulysses degree
    (13, 13, 5, 5, True, None),
    (13, 13, 6, 3, True, None),
    (9, 13, 4, 4, True, None),  # fewer queries than keys: query i sees keys 0..i
    (13, 9, 4, 2, True, None),
    (13, 13, 4, 4, True, ((5, 1), (8, 1))),  # two split segments: local order is not global order
    (3, 3, 2, 1, True, None),  # fewer tokens than ranks: some chunks are empty
]


def local_chunk(x, layout, parts, rank):
    """This rank's tokens (dim 2) of ``x`` under ``layout``."""
    return torch.cat([x.narrow(2, start, length) for start, length in local_ranges(layout, parts, rank)] or [x[:, :, :0]], 2)


def kernel_errors(mesh_shape):
    """On one rank: each kernel case's max abs error against this rank's share of full SDPA."""
    mesh = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
    info = mesh_info(mesh)
    results = {}
    for case in KERNEL_CASES:
        sq, skv, heads, kv_heads, causal, segments = case
        try:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(2, heads, sq, 8, generator=g)
            k, v = (torch.randn(2, kv_heads, skv, 8, generator=g) for _ in range(2))
            expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != heads)
            q_layout, kv_layout = (segments, segments) if segments else (plain(sq), plain(skv))
            share = lambda x, layout: local_chunk(x, layout, info.seq, info.seq_rank)
            out = sharded_attention(
                share(q, q_layout), share(k, kv_layout), share(v, kv_layout), info,
                q_layout=q_layout, kv_layout=kv_layout, bias=None, scale=8 ** -0.5, causal=causal,
            )
            results[case] = (out - share(expected, q_layout)).abs().max().item() if out.numel() else 0.0
        except Exception:
            results[case] = traceback.format_exc()
    return results


def model_errors(cases):
    """On one rank: each ``(mesh shape, model)`` compiled with the para backend vs. eager (the
    passes' graph run as is, as in tests/test_shard.py), with one block: its arithmetic on split
    tokens at half the compile time. Which strategy each site of the two-block model takes, with
    no fallback, is read in-process (test_sites_are_split_not_local)."""
    results, meshes = {}, {}
    for mesh_shape, name in cases:
        if mesh_shape not in meshes:
            meshes[mesh_shape] = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
        mesh = meshes[mesh_shape]
        try:
            model, kwargs = make_model(name, depth=1)
            with torch.no_grad():
                expected = model(**kwargs)
                compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager"))
                results[mesh_shape, name] = (compiled(**kwargs) - expected).abs().max().item()
            torch._dynamo.reset()
        except Exception:
            results[mesh_shape, name] = traceback.format_exc()
    return results


def check_each(per_rank, tolerance=1e-5):
    failures = []
    for rank, results in enumerate(per_rank):
        for case, result in results.items():
            if isinstance(result, str):
                failures.append(f"rank {rank} {case} raised:\n{result}")
            elif result > tolerance:
                failures.append(f"rank {rank} {case}: max abs error {result}")
    assert not failures, "\n".join(failures)


STRATEGY = {(1, 1, 2): "ulysses", (1, 2, 1): "ring", (1, 2, 2): "hybrid", (1, 1, 4): "ulysses", (1, 4, 1): "ring"}
MESHES = {2: [(1, 1, 2), (1, 2, 1)], 4: [(1, 2, 2), (1, 1, 4)]}
KERNEL_MESHES = {2: MESHES[2], 4: MESHES[4] + [(1, 4, 1)]}
# Models compiled on real ranks: every model on both 2-rank meshes; on 4 ranks, those whose heads
# split differently there (fewer key/value heads than ranks, query runs across groups) and the
# replicated memory on the hybrid mesh. The kernel cases run on every mesh.
MODEL_CASES = {
    2: [(mesh_shape, name) for mesh_shape in MESHES[2] for name in MODELS],
    4: [((1, 1, 4), "mqa"), ((1, 1, 4), "gqa_6_2"), ((1, 1, 4), "causal_gqa"), ((1, 2, 2), "causal_memory")],
}


def every_case(world):
    """Kernel and model cases of ``world`` ranks, in one spawn."""
    kernels = {mesh_shape: kernel_errors(mesh_shape) for mesh_shape in KERNEL_MESHES[world]}
    return kernels, model_errors(MODEL_CASES[world])


for _world in (2, 4):
    ranks.add(_world, "grouped-query and causal attention", every_case, _world)


@pytest.mark.ranks
@pytest.mark.parametrize("world", [2, 4])
def test_grouped_query_and_causal_match_one_process(world):
    per_rank = ranks.result(world, "grouped-query and causal attention")
    check_each([{(mesh, case): e for mesh, cases in kernels.items() for case, e in cases.items()} for kernels, _ in per_rank])
    check_each([models for _, models in per_rank])
    assert all(set(models) == set(MODEL_CASES[world]) for _, models in per_rank)


@pytest.mark.parametrize("name", list(MODELS))
def test_sites_are_split_not_local(name):
    """On every mesh of MESHES, Dynamo tracing the model once (explain_meshes: the reports of one
    explain per mesh, 45-55% of their CPU time)."""
    meshes = [dict(world_size=world, ulysses=ulysses, ring=ring) for world, ulysses, ring in ((2, 2, 1), (2, 1, 2), (4, 2, 2), (4, 4, 1))]
    torch._dynamo.reset()  # a fresh compile per model, not Dynamo's recompile limit
    model, kwargs = make_model(name)
    reports = explain_meshes(model, meshes, kwargs=kwargs)
    torch._dynamo.reset()
    for mesh, report in zip(meshes, reports):
        expected = STRATEGY[1, mesh["ring"], mesh["ulysses"]]
        assert [s.strategy for s in report.attention_sites] == [expected, expected], (mesh, str(report))
        assert not report.fallbacks, (mesh, str(report))
