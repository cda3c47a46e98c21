"""What para-fx checks so that ranks never hang and never agree on a wrong answer silently
(the README's "Failure modes"): each case runs on real ranks and must end in a result or a
clear error, never in a hang."""

import io

import pytest
import torch
import torch.distributed as dist

import para_fx
from para_fx.launch import run_ranks


# --- eager context_parallel_attention returns finished tensors ------------------------------------


def eager_attention_saved():
    """Each rank's eager output as torch.save writes it, and as plain math sees it."""
    torch.set_num_threads(1)
    mesh = para_fx.init_mesh()
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 16, generator=g) for _ in range(3))
    part = lambda x: torch.tensor_split(x, 2, dim=2)[rank].contiguous()
    out = para_fx.context_parallel_attention(part(q), part(k), part(v), mesh=mesh)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    expected = part(torch.nn.functional.scaled_dot_product_attention(q, k, v))
    return type(out).__name__, (saved - expected).abs().max().item()


def test_eager_attention_returns_a_finished_tensor():
    for kind, error in run_ranks(eager_attention_saved, 2, timeout=120):
        assert kind == "Tensor"
        assert error <= 1e-5
