"""Patterns that kept diffusers models from splitting, each as a rule on a traced graph and as a tiny
plain-PyTorch model through ``explain`` on a simulated mesh: a RoPE table sliced to the text's
length (Z-Image), a sequence padded into a zero buffer with ``pad_sequence`` (Z-Image), tokens
regrouped by frame for a per-frame attention (Wan-Animate's face attention), and a packed
sequence sliced into two streams with their RoPE tables (Cosmos3 Omni)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import para_fx
import ranks
from para_fx.core.mesh import MeshInfo
from para_fx.core.placement import REPLICATE, Shard, plain
from para_fx.passes.shard import ShardSpec, find_demand, plan
from para_fx.passes.shard_rules import Group, decide

aten = torch.ops.aten
GROUP = Group(parts=2, rank=0, name="unused")
SPEC = ShardSpec("seq", GROUP, MeshInfo(1, 1, 2, 0, 0, 0, "batch", "ring", "ulysses", "seq"))


def traced(fn, *inputs):
    return make_fx(fn, tracing_mode="fake")(*inputs)


def op_node(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


# --- rules ---------------------------------------------------------------------------------------


def test_a_select_scatter_writes_each_ranks_shard():
    gm = traced(lambda buffer, row: buffer.select_scatter(row, 0, 0), torch.zeros(1, 9, 4), torch.randn(9, 4))
    node = op_node(gm, aten.select_scatter.default)
    buffer, row = node.args[:2]
    layout = ((4, 1), (5, 1))
    d = decide(node, {buffer: REPLICATE, row: Shard(0, layout)}, GROUP)
    assert d.reason is None and d.out == Shard(1, layout) and d.inputs == {buffer: Shard(1, layout), row: Shard(0, layout)}
    d = decide(node, {buffer: Shard(0, plain(1)), row: REPLICATE}, GROUP)
    assert d.reason == "scatter into an index of the sharded dim" and d.out == REPLICATE


def test_a_slice_scatter_into_a_whole_buffer_keeps_the_sources_layout():
    gm = traced(lambda buffer, src: buffer.slice_scatter(src, 0, 2, 11), torch.zeros(12, 4), torch.randn(9, 4))
    node = op_node(gm, aten.slice_scatter.default)
    buffer, src = node.args[:2]
    layout = ((4, 1), (5, 1))  # two streams joined by a cat: moving them to a plain split would gather them
    d = decide(node, {buffer: REPLICATE, src: Shard(0, layout)}, GROUP)
    assert d.reason is None and d.inputs[src] == Shard(0, layout)
    assert d.out == d.inputs[buffer] == Shard(0, ((2, 1), (4, 1), (5, 1), (1, 1)))


def test_a_row_written_into_a_buffer_is_split_after_the_write():
    """Embeddings whose middle is overwritten (``x[0, 2:18] = image``): split before the write, the
    buffer would be cut by it; the demand stops at the row's ``select_scatter``."""

    def attention(x, image):
        written = x.select_scatter(x[0].slice_scatter(image, 0, 2, 18), 0, 0)
        q = written.unflatten(-1, (2, 4)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)

    gm = traced(attention, torch.randn(1, 24, 8), torch.randn(16, 8))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert x not in find_demand(gm.graph, SPEC)
    assert not [d.reason for d in plan(gm, SPEC).decisions.values() if d.reason]


def test_a_slice_that_cuts_a_split_where_it_appears_reads_the_whole_value():
    """A table of 11 positions sliced to 10: the table is split where it appears, and the slice,
    which cuts that split, reads the whole table every rank still holds (no gather, no fallback)."""

    def attention(x, table):
        q = (x * table[:10].cos()).unflatten(-1, (2, 4)).transpose(0, 1)[None]
        return F.scaled_dot_product_attention(q, q, q)

    gm = traced(attention, torch.randn(10, 8), torch.randn(11, 8))
    table = [n for n in gm.graph.nodes if n.op == "placeholder"][1]
    p = plan(gm, SPEC)
    assert p.starts[table] == Shard(0, plain(11))
    sliced = op_node(gm, aten.slice.Tensor)
    assert p.decisions[sliced].reason is None and p.decisions[sliced].inputs[table] == REPLICATE


def test_a_plain_demand_takes_the_layout_of_tokens_regrouped_by_frame():
    """Self-attention over 3 frames of 8 tokens accepts any split of the 24 tokens; attention per
    frame needs each frame split alike, ``[(8, 1)] * 3``, which then serves both."""

    def attention(x, motion):
        per_frame = x.unflatten(-1, (2, 4)).unflatten(1, (3, 8)).flatten(0, 1).transpose(1, 2)
        q = x.unflatten(-1, (2, 4)).transpose(1, 2)
        return F.scaled_dot_product_attention(per_frame, motion, motion), F.scaled_dot_product_attention(q, q, q)

    gm = traced(attention, torch.randn(1, 24, 8), torch.randn(3, 2, 5, 4))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert find_demand(gm.graph, SPEC)[x] == Shard(1, plain(8) * 3)
    p = plan(gm, SPEC)
    assert [s.strategy for s in p.sites.values()] == ["local", "ulysses"]
    assert not [d.reason for d in p.decisions.values() if d.reason]


# --- tiny models on a simulated mesh -------------------------------------------------------------


class RefinedText(nn.Module):
    """Z-Image's shape: text refined with a RoPE table longer than the text, sliced to its length,
    then joined with the image tokens by ``pad_sequence`` (a zero buffer written at batch row 0)."""

    def __init__(self, table_len):
        super().__init__()
        self.register_buffer("angles", torch.arange(table_len)[:, None] * torch.linspace(0.1, 1.0, 8))
        self.text_qkv, self.joint_qkv = nn.Linear(8, 24), nn.Linear(8, 24)

    def attend(self, qkv, x):
        q, k, v = qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def forward(self, image, text):
        text = text * self.angles[: text.shape[1]].cos()
        text = text + self.attend(self.text_qkv, text)
        joint = nn.utils.rnn.pad_sequence([torch.cat([image[0], text[0]])], batch_first=True)
        return self.attend(self.joint_qkv, joint)[:, : image.shape[1]]


class FaceAttention(nn.Module):
    """Wan-Animate's shape: self-attention over frames x tokens, then each frame's tokens attend to
    that frame's motion tokens (a per-frame batch of queries)."""

    def __init__(self, frames):
        super().__init__()
        self.frames = frames
        self.qkv, self.q = nn.Linear(8, 24), nn.Linear(8, 8)

    def attend(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def forward(self, x, motion):
        x = self.attend(x)
        q = self.q(x).unflatten(-1, (2, 4)).unflatten(1, (self.frames, -1)).flatten(0, 1).transpose(1, 2)
        per_frame = F.scaled_dot_product_attention(q, motion, motion).transpose(1, 2).flatten(2)
        return self.attend(x + per_frame.unflatten(0, (1, self.frames)).flatten(1, 2))


class PackedStreams(nn.Module):
    """Cosmos3 Omni's shape: one packed sequence sliced into a causal stream and a generated stream
    that attends to both, each with its slice of a RoPE table computed from position ids; the
    slices cut the sequence's and the table's split, and read them whole."""

    def __init__(self, first_len):
        super().__init__()
        self.first_len = first_len
        self.register_buffer("inv_freq", torch.linspace(0.1, 1.0, 2))
        self.first_qkv, self.second_qkv = nn.Linear(8, 24), nn.Linear(8, 24)

    def forward(self, hidden, positions):
        angles = positions[:, None].float() * self.inv_freq
        cos = torch.cat([angles, angles], -1).cos()
        n = self.first_len
        heads = lambda qkv, x, c: (qkv(x).unflatten(-1, (3, 2, 4)) * c[:, None, None]).permute(1, 2, 0, 3)[:, None]
        q1, k1, v1 = heads(self.first_qkv, hidden[:n], cos[:n])
        q2, k2, v2 = heads(self.second_qkv, hidden[n:], cos[n:])
        first = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True)
        second = F.scaled_dot_product_attention(q2, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2))
        return torch.cat([first, second], 2)[0].transpose(0, 1).flatten(1)


def tiny_model(name):
    torch.manual_seed(0)
    if name == "sliced rope table":
        return RefinedText(table_len=16), (torch.randn(1, 12, 8), torch.randn(1, 10, 8))
    if name == "tokens regrouped by frame":
        return FaceAttention(frames=3), (torch.randn(1, 24, 8), torch.randn(3, 2, 5, 4))
    return PackedStreams(first_len=6), (torch.randn(16, 8), torch.arange(16))


@pytest.mark.parametrize("name, strategies", [
    ("sliced rope table", ["ulysses", "ulysses"]),
    ("tokens regrouped by frame", ["ulysses", "local", "ulysses"]),
    ("packed streams", ["ulysses", "ulysses"]),
])
def test_tiny_models_split_without_fallback(name, strategies):
    model, inputs = tiny_model(name)
    torch._dynamo.reset()
    report = para_fx.explain(model, args=inputs, world_size=2)
    torch._dynamo.reset()
    assert report.graph_count == 1
    assert [s.strategy for s in report.attention_sites] == strategies, report.attention_sites
    assert not report.fallbacks, report.fallbacks
    gathers = [c for c in report.collectives if c.kind.startswith("all_gather")]
    assert len(gathers) <= 1, gathers  # the output's only


TINY_MODELS = ("sliced rope table", "tokens regrouped by frame", "packed streams")


def tiny_model_errors():
    """On every rank: each tiny model compiled on Ulysses 2 and on Ring 2 against one process's eager."""
    errors = {}
    for name in TINY_MODELS:
        model, inputs = tiny_model(name)
        with torch.no_grad():
            expected = model(*inputs)
            for ring, ulysses in ((1, 2), (2, 1)):
                torch._dynamo.reset()
                backend = para_fx.backend(mesh=para_fx.init_mesh(ring=ring, ulysses=ulysses), compiler="aot_eager")
                got = torch.compile(model, backend=backend)(*inputs)
                errors[f"{name} ring{ring} ulysses{ulysses}"] = float((got - expected).abs().max() / expected.abs().max())
    return errors


ranks.add(2, "coverage tiny models", tiny_model_errors)


@pytest.mark.ranks
def test_tiny_models_match_one_process_on_two_ranks():
    for errors in ranks.result(2, "coverage tiny models"):
        assert len(errors) == 2 * len(TINY_MODELS)
        assert max(errors.values()) < 1e-5, errors
