"""What para-fx checks so that ranks never hang and never agree on a wrong answer silently
(the README's "Failure modes"): each case runs on real ranks (a case of the world-2 spawn of
tests/ranks.py) and must end in a result or a clear error, never in a hang."""

import io

import pytest
import torch
import torch.distributed as dist

import para_fx
import ranks


# --- eager context_parallel_attention returns finished tensors ------------------------------------


def eager_attention_saved():
    """Each rank's eager output as torch.save writes it, and as plain math sees it."""
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


ranks.add(2, "failure eager attention saved", eager_attention_saved)


@pytest.mark.ranks
def test_eager_attention_returns_a_finished_tensor():
    for kind, error in ranks.result(2, "failure eager attention saved"):
        assert kind == "Tensor"
        assert error <= 1e-5


# --- ranks agree on their inputs ------------------------------------------------------------------


def call_with(change, check_inputs="first", calls=(1, 1), check_timeout=120):
    """Call a compiled plain DiT on two ranks, rank 1's inputs changed by ``change``; the error's text.

    The ranks run niced beside the first tier, so one may reach a check many seconds after the
    other: only the case whose point is a rank that never arrives waits less than two minutes."""
    from para_fx.testing import dits

    rank = dist.get_rank()
    model, kwargs = dits.patch_dit(depth=2)
    if rank == 1:
        kwargs = change(kwargs)
    backend = para_fx.backend(mesh=para_fx.init_mesh(), compiler="eager", check_inputs=check_inputs, check_timeout=check_timeout)
    fn = torch.compile(model, backend=backend)
    try:
        with torch.no_grad():
            for _ in range(calls[rank]):
                fn(**kwargs)
    except (para_fx.InputsDiffer, para_fx.RanksOutOfStep) as error:
        return type(error).__name__, str(error)
    return None


def same(kwargs):
    return kwargs


def other_timestep(kwargs):
    return {**kwargs, "timestep": kwargs["timestep"] + 1}


def third_sample(kwargs):
    return {name: torch.cat([value, value[:1]]) for name, value in kwargs.items()}


ranks.add(2, "failure other timestep", call_with, other_timestep)
ranks.add(2, "failure third sample", call_with, third_sample)
# rank 0 waits 30 s at its third call, both ranks idle: first in the world-2 spawn, while the first
# tier and the world-4 spawn use the cores (run among the others, after the world-4 spawn had done
# its ready cases, it left one of the 2 cores idle for about 25 s)
ranks.add(2, "failure extra call", call_with, same, "every", (3, 2), 30, early=True)


@pytest.mark.ranks
def test_ranks_given_different_values_name_the_input():
    for kind, message in ranks.result(2, "failure other timestep"):
        assert kind == "InputsDiffer"
        assert "different input 'timestep':" in message and "rank 1: float32[2] sum=" in message


@pytest.mark.ranks
def test_ranks_given_different_shapes_name_the_input_instead_of_aborting():
    for kind, message in ranks.result(2, "failure third sample"):
        assert kind == "InputsDiffer"
        assert "input 'x' (and timestep, pooled)" in message and "rank 1: float32[3, 4, 14, 10]" in message


@pytest.mark.ranks
def test_an_extra_call_on_one_rank_is_named_instead_of_hanging():
    rank0, rank1 = ranks.result(2, "failure extra call")
    assert rank1 is None
    kind, message = rank0
    assert kind == "RanksOutOfStep"
    assert "ranks [1] did not reach input check 3" in message


def test_the_check_mode_comes_from_the_backend_or_the_environment(monkeypatch):
    from para_fx.core.agreement import check_mode

    monkeypatch.setenv("PARA_FX_CHECK_INPUTS", "every")
    assert (check_mode(None), check_mode("off")) == ("every", "off")
    with pytest.raises(ValueError, match="check_inputs must be one of"):
        para_fx.backend(check_inputs="always")


# --- compiled context_parallel_attention on a second sequence length -----------------------------


def compiled_attention_lengths(pass_lengths):
    """Max error of a compiled call per (query, key) length pair, one after another."""
    mesh = para_fx.init_mesh()
    rank = dist.get_rank()
    torch._dynamo.reset()
    attend = torch.compile(para_fx.context_parallel_attention, backend="eager", fullgraph=True)
    errors = []
    for sq, skv in ((37, 53), (21, 30), (37, 53)):
        g = torch.Generator().manual_seed(sq)
        q, k, v = torch.randn(1, 2, sq, 8, generator=g), torch.randn(1, 2, skv, 8, generator=g), torch.randn(1, 2, skv, 8, generator=g)
        part = lambda x: torch.tensor_split(x, 2, dim=2)[rank]
        lengths = dict(query_len=sq, kv_len=skv) if pass_lengths else {}
        out = attend(part(q), part(k), part(v), mesh=mesh, **lengths)
        expected = part(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        errors.append((out - expected).abs().max().item())
    return errors


ranks.add(2, "failure compiled attention lengths given", compiled_attention_lengths, True)
ranks.add(2, "failure compiled attention lengths exchanged", compiled_attention_lengths, False)


@pytest.mark.ranks
@pytest.mark.parametrize("pass_lengths", [True, False], ids=["lengths", "exchanged"])
def test_compiled_attention_takes_a_second_sequence_length(pass_lengths):
    case = "given" if pass_lengths else "exchanged"
    for errors in ranks.result(2, f"failure compiled attention lengths {case}"):
        assert len(errors) == 3 and max(errors) <= 1e-5, errors


def test_fingerprints_see_the_imaginary_part_of_complex_inputs():
    """Ranks whose complex inputs (RoPE tables) differ only in the imaginary part must differ."""
    from para_fx.core.agreement import fingerprint

    a = torch.complex(torch.ones(4), torch.zeros(4))
    b = torch.complex(torch.ones(4), torch.full((4,), 0.5))
    assert fingerprint([a]) != fingerprint([b])
    assert fingerprint([a]) == fingerprint([a.clone()])
