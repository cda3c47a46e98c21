"""Attention written as matmuls and a softmax (by the model, or by SDPA's math path) is rewritten as
one scaled_dot_product_attention before the shard pass (passes/attention_patterns.py), so it is
split as any attention is. Structure and the rewritten graph here; numbers on gloo ranks."""

import functools
import re

import expecttest
import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import para_fx
from para_fx.inspect.explain import explain_meshes
from para_fx.core.backend import recording
from para_fx.runtime.attention import attention, attention_with_lse
from para_fx.testing import dits, zoo
import ranks

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # the same DiT code compiled with many attentions


class CausalMatmulAttention(nn.Module):
    """Causal attention written out: the future hidden with ``masked_fill``, the scale given as a
    tensor (``scale_as_tensor``: a form the rewrite leaves alone)."""

    def __init__(self, attention: dits.SelfAttention, scale_as_tensor: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = attention.num_heads, attention.head_dim
        self.qkv, self.proj = attention.qkv, attention.proj
        scale = self.head_dim**-0.5
        self.register_buffer("scale", torch.tensor(scale)) if scale_as_tensor else setattr(self, "scale", scale)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * self.scale
        future = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
        out = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


def causal_matmul_dit(scale_as_tensor: bool = False, **kwargs):
    model, inputs = dits.patch_dit(**kwargs)
    for block in model.blocks:
        block.attn = CausalMatmulAttention(block.attn, scale_as_tensor)
    return model, inputs


FACTORIES = {
    "matmul": dits.matmul_attention_dit,
    "matmul 3 heads": functools.partial(dits.matmul_attention_dit, num_heads=3, dim=48),
    "causal": causal_matmul_dit,
    "mha": dits.mha_dit,
    "mha padded": functools.partial(dits.mha_dit, padded_keys=3),
}


def test_sdpas_math_path_is_split_as_the_fused_kernels_are():
    model, kwargs = dits.patch_dit()
    with sdpa_kernel(SDPBackend.MATH):  # the capture sees bmm, softmax, bmm: no attention op
        report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    assert [s.strategy for s in report.attention_sites] == ["ulysses", "ulysses"]
    [note] = [n for n in report.notes if n.startswith("attention written as matmuls")]
    assert "2 site(s)" in note and "dits.py" in note  # the model's own source line
    assert not [n for n in report.notes if n.startswith("nothing split")]


def half_precision(model, kwargs):
    return model.to(torch.bfloat16), {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                                      for k, v in kwargs.items()}


@pytest.mark.parametrize("factory", ["matmul", "mha", "mha padded"])
def test_attention_written_as_matmuls_is_split_as_sdpa_is(factory):
    """On Ulysses 2 and on Ring 2, Dynamo tracing the model once (explain_meshes)."""
    model, kwargs = FACTORIES[factory]()
    meshes = [dict(world_size=2, ring=1, ulysses=2), dict(world_size=2, ring=2, ulysses=1)]
    torch._dynamo.reset()
    reports = explain_meshes(model, meshes, kwargs=kwargs)
    torch._dynamo.reset()
    for strategy, report in zip(("ulysses", "ring"), reports):
        assert [s.strategy for s in report.attention_sites] == [strategy, strategy]
        assert not [f for f in report.fallbacks if report.in_blocks(f.module)]
        [note] = [n for n in report.notes if n.startswith("attention written as matmuls")]
        assert "2 site(s)" in note and "dits.py" in note  # the model's own source line


def test_keys_hidden_with_masked_fill_become_the_attention_mask():
    model, kwargs = causal_matmul_dit()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, ring=2, ulysses=1)
    assert [s.strategy for s in report.attention_sites] == ["ring", "ring"]
    rows = report.passes()["recognize_attention"].rows
    assert any("aten.logical_not(" in r.line() for r in rows if r.module == "blocks.0.attn")


class PooledSoftmaxAttention(CausalMatmulAttention):
    """A softmax over every query's scores at once (not attention): the scores viewed as one row
    per (sample, head) before the softmax."""

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)).view(B, self.num_heads, S * S).softmax(dim=-1)
        out = scores.view(B, self.num_heads, S, S) @ v
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


def test_a_softmax_over_regrouped_scores_is_not_taken_for_attention():
    model, kwargs = dits.patch_dit()
    for block in model.blocks:
        block.attn = PooledSoftmaxAttention(block.attn)
    report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    assert not report.attention_sites
    assert not [n for n in report.notes if n.startswith("attention written as matmuls")]


def test_a_form_not_recognised_is_left_whole_and_said_so():
    model, kwargs = causal_matmul_dit(scale_as_tensor=True)
    report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    assert not report.attention_sites and not report.collectives
    assert not [n for n in report.notes if n.startswith("attention written as matmuls")]
    [note] = [n for n in report.notes if n.startswith("nothing split")]
    assert "softmax at" in note


def test_without_a_mesh_the_graph_keeps_the_models_matmuls():
    model, kwargs = dits.matmul_attention_dit()
    report = para_fx.explain(model, kwargs=kwargs)
    assert "recognize_attention" not in report.graphs


@pytest.mark.parametrize("with_lse", [False, True])
def test_a_boolean_mask_hides_keys_as_sdpa_reads_it(with_lse):
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    visible = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]  # True = attend
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    got = attention_with_lse(q, k, v, visible, 8**-0.5)[0] if with_lse else attention(q, k, v, visible, 8**-0.5)
    torch.testing.assert_close(got, want)


class TestRewrittenGraph(expecttest.TestCase):
    def test_the_chain_becomes_one_attention_with_the_models_scale_and_bias(self):
        model, kwargs = dits.matmul_attention_dit(depth=1)
        report = para_fx.explain(model, kwargs=kwargs, world_size=2)
        rows = [r for r in report.passes()["recognize_attention"].rows if r.module == "blocks.0.attn"]
        lines = "\n".join(r.line() for r in rows if not re.search(r"= aten\.(t|addmm)\(", r.line()))
        self.assertExpectedInline(lines, """\
view_3 = aten.view(view_2, [2, 35, 3, 4, 16])  # f32[2, 35, 3, 4, 16]  blocks.0.attn
permute = aten.permute(view_3, [2, 0, 3, 1, 4])  # f32[3, 2, 4, 35, 16]  blocks.0.attn
select = aten.select.int(permute, 0, 0)  # f32[2, 4, 35, 16]  blocks.0.attn
select_1 = aten.select.int(permute, 0, 1)  # f32[2, 4, 35, 16]  blocks.0.attn
select_2 = aten.select.int(permute, 0, 2)  # f32[2, 4, 35, 16]  blocks.0.attn
unsqueeze_default = aten.unsqueeze(blocks_0_attn_position_bias, 0)  # f32[1, 4, 35, 35]  blocks.0.attn
scaled_dot_product_attention_default = aten.scaled_dot_product_attention(select, select_1, select_2, attn_mask=unsqueeze_default, scale=0.25)  # f32[2, 4, 35, 16]  blocks.0.attn
transpose_2 = aten.transpose.int(scaled_dot_product_attention_default, 1, 2)  # f32[2, 35, 4, 16]  blocks.0.attn
clone_3 = aten.clone(transpose_2, memory_format=torch.contiguous_format)  # f32[2, 35, 4, 16]  blocks.0.attn
_unsafe_view_5 = aten._unsafe_view(clone_3, [2, 35, 64])  # f32[2, 35, 64]  blocks.0.attn""")


def max_error_on(mesh, model, kwargs) -> float:
    """Relative max error of ``model`` compiled on ``mesh`` against the same model in one process."""
    compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager"))
    with torch.no_grad():
        expected = model(**kwargs)
        return ((compiled(**kwargs) - expected).abs().max() / expected.abs().max()).item()


def matmul_attention_error(batch: int, ring: int, ulysses: int, form: str) -> float:
    """Relative max error of the 2-rank output against the single-process one (fp32)."""
    return max_error_on(para_fx.init_mesh(batch=batch, ring=ring, ulysses=ulysses), *FACTORIES[form](depth=1))


def math_path_error() -> float:
    """The patch DiT with SDPA on its math path (as CUDA runs a head dimension no fused kernel
    takes) on Ring 2: relative max error against one process. (HunyuanVideo's padded text mask on
    the math path, Ulysses 2 and Ring 2, checked the same way by hand: 1.6e-7.)"""
    with sdpa_kernel(SDPBackend.MATH):
        return max_error_on(para_fx.init_mesh(ring=2, ulysses=1), *dits.patch_dit(depth=1))


def masked_math_path_error() -> tuple[float, list[str]]:
    """HunyuanVideo (padded text mask) in bf16 on the math path on Ring 2, which computes in float32
    and adds the mask it built in bf16: relative L2 error against one process (bf16 rounding, where
    a wrong mask or merge gives errors of order one), and the attention sites' strategies."""
    mesh = para_fx.init_mesh(ring=2, ulysses=1)
    model, kwargs = half_precision(*zoo.hunyuan_video(text_pad=2, num_layers=1, num_single_layers=1))
    compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager"))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        expected = model(**kwargs)[0].float()
        with recording() as report:
            got = compiled(**kwargs)[0].float()
    return ((got - expected).norm() / expected.norm()).item(), [site.strategy for site in report.attention_sites]


ranks.add(2, "math path Ring 2", math_path_error)
ranks.add(2, "masked bf16 math path Ring 2", masked_math_path_error)


@pytest.mark.ranks
def test_sdpas_math_path_on_ring_matches_one_process():
    errors = ranks.result(2, "math path Ring 2")
    assert max(errors) <= 1e-4, errors


@pytest.mark.ranks
def test_sdpas_masked_math_path_in_bf16_is_split_and_matches_one_process():
    for error, strategies in ranks.result(2, "masked bf16 math path Ring 2"):
        assert strategies == ["ring"] * 4  # the refiner's, the double block's and the single block's
        assert error <= 1e-2, error


# (batch, ring, ulysses, form): the learned bias on both meshes (and with heads Ulysses does not
# divide), the hidden future keys on Ring (its blocks each see a part of the mask; Ulysses sees it
# whole), nn.MultiheadAttention's [B*H, L, D] matmuls (its (sample, head) pairs split as heads by
# Ulysses, and over the batch)
CASES = {
    "Ulysses 2": (1, 1, 2, "matmul"),
    "Ulysses 2, 3 heads": (1, 1, 2, "matmul 3 heads"),  # the per-head bias padded to 4 heads, 2 a rank
    "Ring 2": (1, 2, 1, "matmul"),
    "Ring 2 causal": (1, 2, 1, "causal"),
    "nn.MultiheadAttention Ulysses 2": (1, 1, 2, "mha"),
    "nn.MultiheadAttention batch 2": (2, 1, 1, "mha"),
    "nn.MultiheadAttention padded keys Ring 2": (1, 2, 1, "mha padded"),
}
for _label, _case in CASES.items():
    ranks.add(2, f"matmul attention {_label}", matmul_attention_error, *_case)


@pytest.mark.ranks
@pytest.mark.parametrize("label", CASES)
def test_matmul_attention_matches_one_process(label):
    errors = ranks.result(2, f"matmul attention {label}")
    assert max(errors) <= 1e-4, errors
