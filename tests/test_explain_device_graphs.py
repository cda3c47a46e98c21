"""explain on graphs as GPUs capture them, reproduced on the CPU: a fused attention, and the FLOPs
of grouped-query attention kernels. (SDPA's math path, what CUDA runs where no fused kernel fits:
tests/test_attention_patterns.py.)"""

import para_fx
from para_fx.inspect.report import attention_flops
from para_fx.testing import dits


def test_explain_splits_the_same_model_with_a_fused_attention():
    model, kwargs = dits.patch_dit()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    assert report.split_sites()
    assert not [n for n in report.notes if n.startswith("nothing split")]


def test_attention_flops_count_grouped_query_heads_once_per_query_head():
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, value_dim = 2, 8, 2, 16, 32, 8, 4
    flops = attention_flops((batch, q_heads, q_len, head_dim), (batch, kv_heads, kv_len, head_dim),
                            (batch, kv_heads, kv_len, value_dim))
    scores = 2 * batch * q_heads * q_len * kv_len * head_dim
    weighted_sum = 2 * batch * q_heads * q_len * kv_len * value_dim
    assert flops == scores + weighted_sum
