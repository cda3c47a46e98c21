"""context_parallel_attention on every 2-, 3- and 4-rank mesh, against full SDPA on one process
(each mesh a case of the one spawn per world size of tests/ranks.py)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import para_fx
import ranks

# (query tokens, key/value tokens, heads, key mask, replicated key/value)
CASES = [
    (37, 53, 3, False, False),
    (32, 32, 4, False, False),
    (37, 53, 5, True, False),
    (16, 23, 6, True, False),
    (37, 53, 3, False, True),
    (29, 11, 2, True, True),
    (3, 2, 2, False, False),  # fewer tokens than ranks: some chunks are empty
]
MESHES = {2: [(1, 1, 2), (1, 2, 1), (2, 1, 1)], 3: [(1, 1, 3), (1, 3, 1), (3, 1, 1)], 4: [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1)]}


def make_inputs(sq, skv, heads, masked, batch, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, sq, dim, generator=g)
    k = torch.randn(batch, heads, skv, dim, generator=g)
    v = torch.randn(batch, heads, skv, dim, generator=g)
    mask = None
    if masked:  # a different number of padding keys per sample, never all of them
        keep = torch.tensor([skv - 1 - (3 * b) % skv for b in range(batch)]).clamp(min=1)
        mask = torch.arange(skv)[None, :] < keep[:, None]
    return q, k, v, mask


def reference(q, k, v, mask, scale=None):
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def shard(x, mesh_shape, coords, seq_dim=2):
    batch, ring, ulysses = mesh_shape
    b, r, u = coords
    x = torch.tensor_split(x, batch, dim=0)[b]
    return torch.tensor_split(x, ring * ulysses, dim=seq_dim)[r * ulysses + u]


def attention_errors(mesh_shape, cases, compiler=None, ring_kv="pass"):
    """On one rank: the max abs error of each case against this rank's shard of full SDPA."""
    mesh = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
    coords = tuple(mesh.get_local_rank(d) for d in ("batch", "ring", "ulysses"))
    attend = para_fx.context_parallel_attention
    if compiler is not None:
        attend = torch.compile(attend, backend=compiler, fullgraph=True)
    errors = []
    for sq, skv, heads, masked, replicated in cases:
        batch = max(2, mesh_shape[0])
        q, k, v, mask = make_inputs(sq, skv, heads, masked, batch)
        expected = shard(reference(q, k, v, mask), mesh_shape, coords)
        kv_shard = (lambda t: torch.tensor_split(t, mesh_shape[0], 0)[coords[0]]) if replicated else (
            lambda t: shard(t, mesh_shape, coords)
        )
        out = attend(
            shard(q, mesh_shape, coords), kv_shard(k), kv_shard(v),
            mesh=mesh, attn_mask=mask, kv_replicated=replicated, ring_kv=ring_kv,
        )
        assert out.shape == expected.shape, (out.shape, expected.shape)
        errors.append((out - expected).abs().max().item() if out.numel() else 0.0)
    return errors


MESH_CASES = [(world, mesh_shape) for world, shapes in MESHES.items() for mesh_shape in shapes]
for _world, _mesh_shape in MESH_CASES:
    ranks.add(_world, f"attention {ranks.mesh_id(_mesh_shape)}", attention_errors, _mesh_shape, CASES)
GATHER_CASES = [(world, mesh_shape) for world, mesh_shape in MESH_CASES if mesh_shape[1] > 1]
for _world, _mesh_shape in GATHER_CASES:
    ranks.add(_world, f"attention gather {ranks.mesh_id(_mesh_shape)}", attention_errors, _mesh_shape, CASES, None,
              "gather")


@pytest.mark.ranks
@pytest.mark.parametrize("world, mesh_shape", MESH_CASES, ids=ranks.mesh_id)
def test_every_mesh_matches_full_sdpa(world, mesh_shape):
    assert_every_case_matches(ranks.result(world, f"attention {ranks.mesh_id(mesh_shape)}"), mesh_shape)


def assert_every_case_matches(per_rank, mesh_shape):
    for rank, errors in enumerate(per_rank):
        assert len(errors) == len(CASES)
        for case, err in zip(CASES, errors):
            assert err <= 1e-5, f"mesh {mesh_shape} rank {rank} case {case}: max abs error {err}"


@pytest.mark.ranks
@pytest.mark.parametrize("world, mesh_shape", GATHER_CASES, ids=ranks.mesh_id)
def test_gathered_ring_matches_full_sdpa(world, mesh_shape):
    """``ring_kv="gather"``: every block gathered and attended at once, the heads in two chunks."""
    assert_every_case_matches(ranks.result(world, f"attention gather {ranks.mesh_id(mesh_shape)}"), mesh_shape)


def explicit_lengths_and_scale():
    mesh = para_fx.init_mesh(ring=2, ulysses=1)
    q, k, v, _ = make_inputs(21, 30, 2, False, 1)
    rank = dist.get_rank()
    out = para_fx.context_parallel_attention(
        torch.tensor_split(q, 2, 2)[rank], torch.tensor_split(k, 2, 2)[rank], torch.tensor_split(v, 2, 2)[rank],
        mesh=mesh, scale=0.3, query_len=21, kv_len=30,
    )
    return (out - torch.tensor_split(reference(q, k, v, None, scale=0.3), 2, 2)[rank]).abs().max().item()


ranks.add(2, "attention explicit lengths and scale", explicit_lengths_and_scale)


@pytest.mark.ranks
def test_explicit_lengths_and_scale():
    assert max(ranks.result(2, "attention explicit lengths and scale")) <= 1e-5


# (query tokens, key/value tokens, query heads, key/value heads, replicated key/value)
CAUSAL_CASES = [(13, 13, 4, 4, False), (13, 13, 6, 2, False), (9, 13, 4, 2, True), (13, 13, 4, 1, True)]


def causal_and_grouped_errors(mesh_shape, causal=True, ring_kv="pass"):
    """``is_causal`` and fewer key/value heads through the public call, against SDPA's own."""
    mesh = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
    coords = tuple(mesh.get_local_rank(d) for d in ("batch", "ring", "ulysses"))
    errors = []
    for sq, skv, heads, kv_heads, replicated in CAUSAL_CASES:
        g = torch.Generator().manual_seed(sq * heads + kv_heads)
        q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((heads, sq), (kv_heads, skv), (kv_heads, skv)))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != heads)
        kv_shard = (lambda t: torch.tensor_split(t, mesh_shape[0], 0)[coords[0]]) if replicated else (
            lambda t: shard(t, mesh_shape, coords)
        )
        out = para_fx.context_parallel_attention(
            shard(q, mesh_shape, coords), kv_shard(k), kv_shard(v), mesh=mesh, kv_replicated=replicated,
            is_causal=causal, ring_kv=ring_kv,
        )
        errors.append((out - shard(expected, mesh_shape, coords)).abs().max().item())
    return errors


for _mesh_shape in MESHES[2]:
    ranks.add(2, f"attention causal {ranks.mesh_id(_mesh_shape)}", causal_and_grouped_errors, _mesh_shape)


@pytest.mark.ranks
@pytest.mark.parametrize("mesh_shape", MESHES[2], ids=ranks.mesh_id)
def test_causal_and_grouped_query_attention_match_sdpa(mesh_shape):
    for rank, errors in enumerate(ranks.result(2, f"attention causal {ranks.mesh_id(mesh_shape)}")):
        assert len(errors) == len(CAUSAL_CASES) and max(errors) <= 1e-5, f"mesh {mesh_shape} rank {rank}: {errors}"


# gathered keys/values with grouped-query heads: Ring alone (two head chunks of 2:1 and one of 4:1) and
# hybrid (Ulysses leaves each rank 2 or 3 query heads)
GATHER_GQA_MESHES = [(2, (1, 2, 1)), (4, (1, 2, 2))]
for _world, _mesh_shape in GATHER_GQA_MESHES:
    ranks.add(_world, f"attention gather grouped {ranks.mesh_id(_mesh_shape)}", causal_and_grouped_errors,
              _mesh_shape, False, "gather")


@pytest.mark.ranks
@pytest.mark.parametrize("world, mesh_shape", GATHER_GQA_MESHES, ids=ranks.mesh_id)
def test_gathered_ring_with_grouped_query_heads_matches_sdpa(world, mesh_shape):
    for rank, errors in enumerate(ranks.result(world, f"attention gather grouped {ranks.mesh_id(mesh_shape)}")):
        assert len(errors) == len(CAUSAL_CASES) and max(errors) <= 1e-5, f"mesh {mesh_shape} rank {rank}: {errors}"


def test_causal_with_a_mask_is_refused():
    q, k, v, mask = make_inputs(7, 7, 2, True, 1)
    with pytest.raises(ValueError, match="not both"):
        para_fx.context_parallel_attention(q, k, v, mesh=None, attn_mask=mask, is_causal=True)
    out = para_fx.context_parallel_attention(q, k, v, mesh=None, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def wrong_chunk_raises():
    mesh = para_fx.init_mesh()
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="tensor_split"):
        para_fx.context_parallel_attention(q, q, q, mesh=mesh, query_len=12, kv_len=12)
    return True


ranks.add(2, "attention wrong chunk length", wrong_chunk_raises)


@pytest.mark.ranks
def test_wrong_chunk_length_is_an_error():
    assert ranks.result(2, "attention wrong chunk length") == [True, True]


# Inductor on 2 ranks, as every rank pays for its compiles: masked keys split over a Ring of 2 (the
# ring's exchange and the mask's slicing), and over Ulysses 2 (the all-to-alls); the hybrid mesh
# composes the two, in eager on every 4-rank mesh above. Replicated keys and values without a causal
# mask attend locally, with no collective: plain SDPA.
INDUCTOR_CASES = [(37, 53, 3, True, False)]
INDUCTOR_MESHES = [(1, 2, 1), (1, 1, 2)]
for _mesh_shape in INDUCTOR_MESHES:
    ranks.add(2, f"attention {ranks.mesh_id(_mesh_shape)} inductor", attention_errors, _mesh_shape, INDUCTOR_CASES, "inductor")


@pytest.mark.ranks
@pytest.mark.parametrize("mesh_shape", INDUCTOR_MESHES, ids=ranks.mesh_id)
def test_inductor_fullgraph(mesh_shape):
    for rank, errors in enumerate(ranks.result(2, f"attention {ranks.mesh_id(mesh_shape)} inductor")):
        assert len(errors) == len(INDUCTOR_CASES) and max(errors) <= 1e-5, f"rank {rank}: {errors}"


def test_no_mesh_is_plain_sdpa():
    q, k, v, mask = make_inputs(7, 9, 2, True, 2)
    out = para_fx.context_parallel_attention(q, k, v, mesh=None, attn_mask=mask)
    torch.testing.assert_close(out, reference(q, k, v, mask))
