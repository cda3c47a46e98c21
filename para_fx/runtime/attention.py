"""Context-parallel attention: Ulysses, Ring and both, from functional collectives.

Every rank holds a contiguous chunk of the sequence (``torch.tensor_split`` over the flattened
(ring, ulysses) group). Ulysses trades sequence for heads with one all-to-all; Ring then passes
key/value blocks around the ring group while the current block computes, and merges the partial
outputs with their log-sum-exp in fp32 (or, asked to, gathers every block at once and attends in one
kernel per head chunk). Uneven chunks are padded for transport and sliced after
receipt: every rank knows every chunk length, so no masking of padding is needed.

The collectives are ``torch.ops._c10d_functional`` ops (through ``torch.distributed._functional_collectives``)
so that Inductor sees them and can overlap them with compute.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from ..core.mesh import MeshInfo, traceable_mesh_info
from ..core.placement import Layout, local_ranges, local_size, plain

aten = torch.ops.aten


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mesh: DeviceMesh | None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    kv_replicated: bool = False,
    query_len: int | None = None,
    kv_len: int | None = None,
    is_causal: bool = False,
    ring_kv: str = "pass",
    ring_transport: str = "nccl",
) -> torch.Tensor:
    """This rank's shard of ``scaled_dot_product_attention`` over the whole sequence.

    ``query``/``key``/``value`` are ``[B, H, S_local, D]`` shards, split like
    ``torch.tensor_split(x, seq_world, dim=2)`` (and over dim 0 by the mesh's batch dim).
    ``kv_replicated=True``: key/value are the full sequence on every rank (no communication).
    ``attn_mask``: boolean key padding mask ``[B, S_kv_global]``, True = attend.
    ``query_len``/``kv_len``: the global lengths. A rank cannot infer them from its own chunk, so
    when they are not given (and ``attn_mask`` does not tell ``kv_len``) the ranks exchange them:
    eagerly on every call, or once when torch.compile traces the call. Pass them when a compiled
    caller changes lengths between calls, so every rank's graph agrees on them.
    ``is_causal``: query i attends to keys 0..i by global position, as SDPA's ``is_causal``.
    Key/value may have fewer heads than the query (grouped-query attention, SDPA's ``enable_gqa``).
    ``ring_kv``: "pass" or "gather", how Ring brings the other ranks' keys/values, and
    ``ring_transport``: "nccl" or "copy_engine", what carries them (see :func:`sharded_attention`).
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("context_parallel_attention expects [B, H, S, D] query, key and value")
    if key.shape != value.shape[:-1] + key.shape[-1:] or query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
        raise ValueError(f"incompatible shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    if is_causal and attn_mask is not None:
        raise ValueError("context_parallel_attention: give attn_mask or is_causal, not both (as SDPA)")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    info = None if mesh is None else traceable_mesh_info(mesh)
    if attn_mask is not None:
        attn_mask = _local_batch_mask(attn_mask, query.shape[0], info)
    if info is None or info.seq == 1 or (kv_replicated and not is_causal):
        return local_attention(query, key, value, attn_mask, scale, is_causal)
    if kv_replicated:  # a causal mask goes by global positions, which the sharded path knows: this
        kv_len = _static(key.shape[2])  # rank's chunk of the replicated keys/values is a free slice
        key, value = (torch.tensor_split(x, info.seq, dim=2)[info.seq_rank] for x in (key, value))
    if kv_len is None and attn_mask is not None:
        kv_len = attn_mask.shape[-1]
    # Plain ints: once a length changes, Dynamo makes sizes and int arguments symbolic, which the
    # layout arithmetic and the trace-time exchange cannot take. operator.index specialises them
    # (one graph per length), where Dynamo keeps int() symbolic.
    query_len, kv_len = _static(query_len), _static(kv_len)
    if query_len is None or kv_len is None:
        q_global, kv_global = _exchange_lengths(info.seq_group, _static(query.shape[2]), _static(key.shape[2]))
        query_len = query_len if query_len is not None else q_global
        kv_len = kv_len if kv_len is not None else kv_global
    bias = None if attn_mask is None else _key_mask_to_bias(attn_mask, query.dtype)
    out = sharded_attention(
        query, key, value, info, q_layout=plain(query_len), kv_layout=plain(kv_len), bias=bias, scale=scale,
        causal=is_causal, ring_kv=ring_kv, ring_transport=ring_transport,
    )
    if isinstance(out, funcol.AsyncCollectiveTensor):  # eager: finish the transfer before the caller
        out = out.wait()  # sees it (torch.save, all_gather_object and .numpy() read memory as it is)
    return out


def _static(length: int | None) -> int | None:
    return None if length is None else operator.index(length)


def _key_mask_to_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _additive(key_mask, dtype)[:, None, None, :]


def _local_batch_mask(mask: torch.Tensor, local_batch: int, info: MeshInfo | None) -> torch.Tensor:
    """The rows of a global ``[B, S_kv]`` key mask that belong to this rank's batch chunk."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be a boolean [B, S_kv] key padding mask, got {mask.dtype} {tuple(mask.shape)}")
    if mask.shape[0] in (1, local_batch) or info is None or info.batch == 1:
        return mask
    return torch.tensor_split(mask, info.batch, dim=0)[info.batch_rank]


def _exchange_lengths(group: str, q_local: int, kv_local: int) -> tuple[int, int]:
    if torch.compiler.is_compiling():
        return _exchange_lengths_at_trace_time(group, q_local, kv_local)
    return _all_gather_lengths(group, q_local, kv_local)


def _all_gather_lengths(group: str, q_local: int, kv_local: int) -> tuple[int, int]:
    """Global (query, key/value) lengths: the sum of every sequence rank's chunk."""
    pg = dist.distributed_c10d._resolve_process_group(group)
    device = "cuda" if dist.get_backend(pg) == "nccl" else "cpu"
    local = torch.tensor([q_local, kv_local], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(gathered, local, group=pg)
    total = torch.stack(gathered).sum(0).tolist()
    return int(total[0]), int(total[1])


_exchange_lengths_at_trace_time = torch._dynamo.assume_constant_result(_all_gather_lengths)


def local_attention(q, k, v, key_mask: torch.Tensor | None, scale: float, causal: bool = False) -> torch.Tensor:
    """Plain attention of local query against full key/value (cross-attention, world size 1)."""
    if q.shape[-2] == 0:  # fewer tokens than ranks; kernels reject empty queries
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=scale, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1]
    )


def sharded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    info: MeshInfo,
    *,
    q_layout: Layout,
    kv_layout: Layout,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool = False,
    ring_kv: str = "pass",
    ring_transport: str = "nccl",
) -> torch.Tensor:
    """Ulysses over the "ulysses" dim, then Ring over the "ring" dim.

    ``q_layout``/``kv_layout`` say which global tokens each sequence rank holds (see
    :mod:`para_fx.core.placement`); they are static, so every transport size is known. ``bias`` is a
    replicated additive mask ``[B|1, 1, 1|S_q, S_kv]`` in global token order. ``causal``: the query
    at global position i sees the keys at global positions <= i (SDPA's ``is_causal``). Key/value
    may have fewer heads than the query (grouped-query attention, query head h using key/value head
    ``h // (H / H_kv)``): Ulysses gives each rank the key/value heads its query heads use, and Ring
    passes those on. ``ring_kv``: how Ring brings the other groups' keys/values: "pass" them round
    the ring, one block per step while the current one computes, merging partial outputs by their
    log-sum-exp; or "gather" them all at once and attend in one kernel per head chunk, the second
    chunk's transfer hidden behind the first chunk's attention (no merge, longer kernels; memory for
    every block; causal attention always passes). ``ring_transport``: what carries the passed blocks
    between CUDA devices: "nccl" kernels, or "copy_engine" (Ring of 2 only): the GPUs' copy engines
    through symmetric memory, so that no SM is taken from the attention the transfer overlaps.
    Elsewhere (CPU, gathered blocks, Ulysses) the transfers are NCCL's or gloo's either way.
    """
    if ring_kv not in RING_KV:
        raise ValueError(f"sharded_attention: ring_kv must be one of {RING_KV}, got {ring_kv!r}")
    check_ring_transport(ring_transport, info.ring)
    heads = q.shape[1]
    n, u = info.seq, info.ulysses
    q_lens = [local_size(q_layout, n, r) for r in range(n)]
    kv_lens = [local_size(kv_layout, n, r) for r in range(n)]
    _check_local_length("query", q, q_lens[info.seq_rank])
    _check_local_length("key", k, kv_lens[info.seq_rank])
    group_ranks = [range(g * u, (g + 1) * u) for g in range(info.ring)]
    kv = torch.stack([k, v])  # one transport for both
    mine = group_ranks[info.ring_rank]
    if u > 1:
        q = _sequence_to_heads(q, [q_lens[r] for r in mine], info)
        kv = _sequence_to_heads(_kv_heads_per_query_split(kv, heads, u), [kv_lens[r] for r in mine], info)
    # the global positions of this ring group's queries and of each ring group's keys, in local order
    q_ranges = [rg for r in mine for rg in local_ranges(q_layout, n, r)]
    kv_ranges = [[rg for r in ranks for rg in local_ranges(kv_layout, n, r)] for ranks in group_ranks]
    if bias is not None:
        if bias.shape[1] > 1 and u > 1:  # a per-head mask: keep the heads this rank attends with
            per_rank = -(-heads // u)
            bias = _pad_dim(bias, 1, per_rank * u).narrow(1, info.ulysses_rank * per_rank, per_rank)
        if bias.shape[2] > 1:  # a per-query mask: keep the rows of this ring group's queries
            bias = _take(bias, 2, q_ranges)
        blocks = [BlockMask(_take(bias, 3, ranges)) for ranges in kv_ranges]
    else:
        blocks = [BlockMask() for _ in group_ranks]
    if causal:
        blocks = [_causal_block(block, q_ranges, ranges, q) for block, ranges in zip(blocks, kv_ranges)]
    ring_kv_lens = [sum(kv_lens[r] for r in ranks) for ranks in group_ranks]
    if ring_kv == "gather" and info.ring > 1 and not causal:
        out = _gathered_attention(q, kv, info, ring_kv_lens, blocks, scale)
    else:
        out = _ring_attention(q, kv, info, ring_kv_lens, blocks, scale, ring_transport)
    if u > 1:
        out = _heads_to_sequence(out, [q_lens[r] for r in mine], heads, info)
    return out


def flex_to_heads(q, k, v, info: MeshInfo, *, q_layout: Layout, kv_layout: Layout):
    """Ulysses for flex attention: ``[B, H, L_mine, D]`` shards in, ``[B, ceil(H/U), S, D]`` out, every
    token of this rank's heads, in global order (a block mask and the mods index global positions).
    Key/value heads are repeated as for SDPA where they are fewer (grouped-query)."""
    n = info.seq
    q_lens = [local_size(q_layout, n, r) for r in range(n)]
    kv_lens = [local_size(kv_layout, n, r) for r in range(n)]
    _check_local_length("query", q, q_lens[info.seq_rank])
    _check_local_length("key", k, kv_lens[info.seq_rank])
    heads, u = q.shape[1], info.ulysses
    q = _in_global_order(_sequence_to_heads(q, q_lens, info), _all_ranges(q_layout, n))
    kv_ranges = _all_ranges(kv_layout, n)
    if k.shape == v.shape:  # one transport for both
        kv = _sequence_to_heads(_kv_heads_per_query_split(torch.stack([k, v]), heads, u), kv_lens, info)
        k, v = _in_global_order(kv, kv_ranges).unbind(0)
    else:
        k, v = (_in_global_order(_sequence_to_heads(_kv_heads_per_query_split(x[None], heads, u), kv_lens, info)[0],
                                 kv_ranges) for x in (k, v))
    return q, k, v


def flex_to_sequence(out: torch.Tensor, info: MeshInfo, *, q_layout: Layout, heads: int) -> torch.Tensor:
    """Inverse of :func:`flex_to_heads` for the output: ``[B, ceil(H/U), S, D]`` -> ``[B, H, L_mine, D]``."""
    n = info.seq
    ranges = _all_ranges(q_layout, n)
    out = _take(out, 2, ranges) if not _increasing(ranges) else out  # global order -> the ranks' chunks, in rank order
    return _heads_to_sequence(out, [local_size(q_layout, n, r) for r in range(n)], heads, info)


def flex_block_mask_heads(t: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """This rank's heads of a per-head block mask tensor ``[B, H, ...]``."""
    return t.narrow(1, first, count).contiguous()


def _all_ranges(layout: Layout, n: int) -> list[tuple[int, int]]:
    """``(start, length)`` of every rank's pieces, rank after rank: the order Ulysses gathers tokens in."""
    return [rg for r in range(n) for rg in local_ranges(layout, n, r)]


def _in_global_order(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Tokens gathered rank after rank (``ranges``, their global positions) put in global order."""
    if _increasing(ranges):
        return x
    offsets, at = [], 0
    for start, length in ranges:
        offsets.append((start, at, length))
        at += length
    return torch.cat([x.narrow(-2, at, length) for _, at, length in sorted(offsets)], dim=-2)


RING_KV = ("pass", "gather")
RING_TRANSPORTS = ("nccl", "copy_engine")


def check_ring_transport(transport: str, ring: int) -> None:
    """Refuse a transport that cannot carry this ring's blocks."""
    if transport not in RING_TRANSPORTS:
        raise ValueError(f"ring_transport must be one of {RING_TRANSPORTS}, got {transport!r}")
    if transport == "copy_engine" and ring > 2:
        raise ValueError(f"ring_transport='copy_engine' passes blocks in a ring of 2 ranks, this mesh's ring has {ring}")


class BlockMask(NamedTuple):
    """How this rank's queries attend to one ring block of keys: skipped, or with an additive
    ``bias`` and/or the kernel's own causal mask (used only where local and global order agree)."""

    bias: torch.Tensor | None = None
    causal: bool = False
    skip: bool = False


def _causal_block(block: BlockMask, q_ranges: list[tuple[int, int]], kv_ranges: list[tuple[int, int]], like: torch.Tensor) -> BlockMask:
    """``block`` restricted to keys at global positions <= each query's: a block wholly in the
    queries' future is skipped, one wholly in their past is unmasked, the diagonal block is masked
    by the kernel where queries and keys are the same increasing positions, by a bias otherwise."""
    if not q_ranges or not kv_ranges:  # no query or no key here: nothing is computed
        return block
    first_query, last_query = min(start for start, _ in q_ranges), max(start + length - 1 for start, length in q_ranges)
    first_key, last_key = min(start for start, _ in kv_ranges), max(start + length - 1 for start, length in kv_ranges)
    if first_key > last_query:
        return BlockMask(skip=True)
    if last_key <= first_query:
        return block
    if block.bias is None and q_ranges == kv_ranges and _increasing(q_ranges):
        return BlockMask(causal=True)
    seen = _positions(kv_ranges, like.device)[None, :] <= _positions(q_ranges, like.device)[:, None]
    bias = _additive(seen, like.dtype)
    return BlockMask(bias[None, None] if block.bias is None else block.bias + bias)


def _increasing(ranges: list[tuple[int, int]]) -> bool:
    return all(start >= prev_start + prev_length for (prev_start, prev_length), (start, _) in zip(ranges, ranges[1:]))


def _positions(ranges: list[tuple[int, int]], device) -> torch.Tensor:
    return torch.cat([torch.arange(start, start + length, device=device) for start, length in ranges])


def _kv_heads_per_query_split(kv: torch.Tensor, heads: int, u: int) -> torch.Tensor:
    """Key/value heads ``[2, B, H_kv, L, D]`` repeated so that Ulysses' split of them in ``u`` gives each
    rank the heads its ``ceil(H / u)`` query heads use, in grouped-query order. Query heads are split in
    aligned runs of ``gcd(ceil(H / u), H / H_kv)``, each within one group; one key/value head per run."""
    group = heads // kv.shape[2]
    run = math.gcd(-(-heads // u), group)
    return kv.repeat_interleave(group // run, dim=2) if group > run else kv


def _take(x: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The given ``(start, length)`` ranges of ``dim``, concatenated."""
    if len(ranges) == 1:
        return x.narrow(dim, *ranges[0])
    if not ranges:
        return x.narrow(dim, 0, 0)
    return torch.cat([x.narrow(dim, start, length) for start, length in ranges], dim)


def _check_local_length(name: str, x: torch.Tensor, expected: int) -> None:
    if x.shape[2] != expected:
        raise ValueError(
            f"context_parallel_attention: this rank's {name} chunk has {x.shape[2]} tokens, but "
            f"torch.tensor_split of the global sequence gives it {expected}"
        )


def _sequence_to_heads(x: torch.Tensor, lens: list[int], info: MeshInfo) -> torch.Tensor:
    """``[..., H, L_mine, D]`` -> ``[..., ceil(H/U), sum(lens), D]``: all Ulysses ranks' tokens, my heads."""
    u = info.ulysses
    *lead, heads, _, dim = x.shape
    padded_heads = -(-heads // u) * u
    longest = max(lens)
    x = _pad_dim(_pad_dim(x, -3, padded_heads), -2, longest)
    x = x.reshape(*lead, u, padded_heads // u, longest, dim)
    x = x.movedim(len(lead), 0).contiguous()  # [U (destination), ..., H/U, T, D]
    x = funcol.all_to_all_single(x, None, None, info.ulysses_group)  # [U (source), ...]
    pieces = [x[src, ..., : lens[src], :] for src in range(u)]
    return torch.cat(pieces, dim=-2)


def _heads_to_sequence(x: torch.Tensor, lens: list[int], heads: int, info: MeshInfo) -> torch.Tensor:
    """Inverse of :func:`_sequence_to_heads`: ``[B, ceil(H/U), sum(lens), D]`` -> ``[B, H, L_mine, D]``."""
    longest = max(lens)
    pieces = torch.split(x, lens, dim=-2)
    x = torch.stack([_pad_dim(p, -2, longest) for p in pieces])  # [U (destination), B, H/U, T, D]
    x = funcol.all_to_all_single(x, None, None, info.ulysses_group)  # [U (head chunk), B, H/U, T, D]
    batch, dim = x.shape[1], x.shape[-1]
    x = x.movedim(0, 1).reshape(batch, -1, longest, dim)
    return x[:, :heads, : lens[info.ulysses_rank]]


def _pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` zero-padded at the end of ``dim`` (negative or not) to ``size``."""
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - dim % x.dim() - 1) + [0, extra]  # F.pad lists the last dim first
    return torch.nn.functional.pad(x, pad)


def _ring_attention(q, kv, info: MeshInfo, lens: list[int], masks: list[BlockMask], scale: float, transport: str = "nccl"):
    """Attend to every ring group's key/value block, passing blocks on while the current one computes."""
    r = info.ring
    if r == 1:  # one block: no log-sum-exp to merge, so SDPA's own choice of kernel
        if not (q.shape[-2] and lens[0]) or masks[0].skip:
            return torch.zeros_like(q)
        return attention(q, kv[0], kv[1], masks[0].bias, scale, masks[0].causal)
    kv = _pad_dim(kv, -2, max(lens))  # every rank passes blocks of one size on
    if q.shape[-2] == 0:  # this rank holds no query token (fewer tokens than ranks); kernels reject empty queries
        lens = [0] * r
    out = lse = None
    for step in range(r):
        source = (info.ring_rank - step) % r
        if step + 1 < r:
            next_kv = _pass_to_next(kv, info, transport)
        if lens[source] and not masks[source].skip:
            block = kv[..., : lens[source], :]
            mask = masks[source]
            block_out, block_lse = attention_with_lse(q, block[0], block[1], mask.bias, scale, mask.causal)
            out, lse = _merge(out, lse, block_out, block_lse)
        if step + 1 < r:
            kv = next_kv
    if out is None:  # no query here, or no key anywhere
        return torch.zeros_like(q)
    return out.to(q.dtype)


def _gathered_attention(q, kv, info: MeshInfo, lens: list[int], masks: list[BlockMask], scale: float):
    """Attention to every ring group's key/value block, gathered: the heads in two chunks, each
    gathered by its own collective, so that the second chunk travels while the first computes."""
    if not any(lens):  # no key anywhere (the same on every rank)
        return torch.zeros_like(q)
    kv = _pad_dim(kv, -2, max(lens))  # [2, B, H_kv, T, D], every rank's block one size
    kv_heads = kv.shape[2]
    chunks = 2 if kv_heads % 2 == 0 and q.shape[1] % 2 == 0 else 1
    gathered = [funcol.all_gather_tensor(part.contiguous(), 0, info.ring_group) for part in kv.chunk(chunks, dim=2)]
    if q.shape[-2] == 0:  # no query token here (fewer tokens than ranks): the others still need my
        # keys; the output depends on the transfers, so no compiler drops them as unused
        return torch.zeros_like(q) + sum(part.sum() for part in gathered) * 0
    gathered = [part.view(info.ring, 2, *part.shape[1:]) for part in gathered]  # each [R, 2, B, H_kv / chunks, T, D]
    bias = None
    if masks[0].bias is not None:
        bias = torch.cat([m.bias for m in masks], dim=-1)
    q_per_chunk = q.shape[1] // chunks
    outs = []
    for i, part in enumerate(gathered):
        full = torch.cat([part[s, ..., : lens[s], :] for s in range(info.ring) if lens[s]], dim=-2)
        chunk_bias = bias
        if bias is not None and bias.shape[1] > 1:
            chunk_bias = bias.narrow(1, i * q_per_chunk, q_per_chunk)
        outs.append(attention(q.narrow(1, i * q_per_chunk, q_per_chunk), full[0], full[1], chunk_bias, scale))
    return outs[0] if chunks == 1 else torch.cat(outs, dim=1)


def _pass_to_next(x: torch.Tensor, info: MeshInfo, transport: str = "nccl") -> torch.Tensor:
    """Send ``x`` to the next ring rank and receive the previous one's (an all-to-all with one non-empty split)."""
    r, me = info.ring, info.ring_rank
    flat = x.reshape(-1)
    if transport == "copy_engine" and x.is_cuda:
        return _swap_on_copy_engine(flat, info).view(x.shape)
    send = [0] * r
    recv = [0] * r
    send[(me + 1) % r] = flat.numel()
    recv[(me - 1) % r] = flat.numel()
    return funcol.all_to_all_single(flat, recv, send, info.ring_group).view(x.shape)


def _swap_on_copy_engine(flat: torch.Tensor, info: MeshInfo) -> torch.Tensor:
    """The other rank's ``flat`` in a ring of 2, copied by the copy engines (NCCL's kernels would
    hold SMs that the overlapped attention and matmuls need). Asynchronous as the functional
    collectives are: the result is waited for where used."""
    from . import symmetric_swap

    slot = symmetric_swap.prepare(info.ring_group, flat.numel() * flat.element_size(), flat.device)
    return funcol._maybe_wrap_tensor(torch.ops.para_fx.swap_pair(flat, info.ring_group, slot))


def _merge(out, lse, block_out, block_lse):
    """Combine two softmax-normalised partial results by their log-sum-exp, in fp32."""
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    base = new_lse.masked_fill(new_lse == float("-inf"), 0.0)
    out = out * torch.exp(lse - base).unsqueeze(-1) + block_out * torch.exp(block_lse - base).unsqueeze(-1)
    return out, new_lse


def attention(q, k, v, bias: torch.Tensor | None, scale: float, causal: bool = False) -> torch.Tensor:
    """SDPA of one whole block: the front door picks the fastest kernel for the device and aligns
    the mask. Rows whose keys are all masked give 0, as in :func:`attention_with_lse`. Key/value
    may have fewer heads than the query (grouped-query)."""
    if bias is not None:
        bias = _additive(bias, q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    if bias is not None:
        out = out.masked_fill(~(bias > float("-inf")).any(-1, keepdim=True), 0.0)
    return out


def attention_with_lse(q, k, v, bias: torch.Tensor | None, scale: float, causal: bool = False):
    """``(out, lse)`` of SDPA, lse as fp32 ``[B, H, L]``; rows whose keys are all masked get lse = -inf, out = 0.

    ``causal`` is the kernel's own mask (key j <= query i, by local index); callers use it only for
    square blocks, where every kernel's convention agrees. Key/value may have fewer heads than the
    query: the CPU kernel takes them as they are; on CUDA they are repeated to the query's count,
    as not every kernel that returns a log-sum-exp takes grouped heads."""
    if bias is not None:
        bias = _additive(bias, q.dtype)
    if q.device.type == "cuda":
        if k.shape[1] != q.shape[1]:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        out, lse = _cuda_attention_with_lse(q, k, v, bias, scale, causal)
    else:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    lse = lse.float()
    if bias is not None:  # kernels disagree on fully masked rows: make them contribute nothing
        attended = (bias > float("-inf")).any(-1)  # [B|1, 1, 1|L]
        lse = lse.masked_fill(~attended, float("-inf"))
        out = out.masked_fill(~attended[..., None], 0.0)
    return out, lse


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as the bias added to the scores: a boolean one (True = attend, as SDPA
    reads it) as 0 and -inf, not as 1 and 0."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def lse_kernel(dtype: torch.dtype, head_dim: int, masked: bool, capability: tuple[int, int], cudnn_enabled: bool) -> str:
    """The CUDA kernel that returns a log-sum-exp fastest: cuDNN on Hopper and newer (about twice
    flash's speed there, the log-sum-exp at no extra cost), flash elsewhere, the memory-efficient
    kernel for masks and fp32."""
    half = dtype in (torch.float16, torch.bfloat16)
    if half and not masked and cudnn_enabled and capability >= (9, 0) and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    if half and not masked and head_dim <= 256:
        return "flash"
    return "efficient"


def _cuda_attention_with_lse(q, k, v, bias, scale, causal):
    kernel = _device_lse_kernel(q.dtype, int(q.shape[-1]), bias is not None, q.device.index)
    return LSE_KERNELS[kernel](q, k, v, bias, scale, causal)


@torch.compiler.assume_constant_result  # read the device and the SDPA switches when Dynamo traces
def _device_lse_kernel(dtype: torch.dtype, head_dim: int, masked: bool, device_index: int | None) -> str:
    return lse_kernel(
        dtype, head_dim, masked, torch.cuda.get_device_capability(device_index), torch.backends.cuda.cudnn_sdp_enabled()
    )


def _cudnn_with_lse(q, k, v, bias, scale, causal=False):
    out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])  # cuDNN's log-sum-exp is [B, H, L, 1]


def _flash_with_lse(q, k, v, bias, scale, causal=False):
    return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]


def _efficient_with_lse(q, k, v, bias, scale, causal=False):
    if bias is not None:
        bias = _aligned_bias(bias).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


# (q, k, v, bias or None, scale, causal) -> (out, lse [B, H, L]); lse_kernel picks one
LSE_KERNELS = {"cudnn": _cudnn_with_lse, "flash": _flash_with_lse, "efficient": _efficient_with_lse}


def _aligned_bias(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` with every stride a multiple of 16 elements, as the memory-efficient kernel needs
    (and SDPA's front door does): the key dim padded in memory, then narrowed back."""
    keys = bias.shape[-1]
    padded = -(-keys // 16) * 16
    if padded == keys and all(s % 16 == 0 for s, n in zip(bias.stride()[:-1], bias.shape[:-1]) if n > 1):
        return bias
    return torch.nn.functional.pad(bias, [0, padded - keys]).narrow(-1, 0, keys)
