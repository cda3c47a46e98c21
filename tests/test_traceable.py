"""make_traceable on models whose graph breaks are in their own code, not (only) in an attention processor.

Each model is diffusers' real class with a tiny random config. Made traceable, it must give the
stock model's outputs (fp32, <= 1e-5), compile to one graph with every attention site split over a
simulated world of 2, give the same outputs on 2 real ranks, and refuse the inputs its static
program cannot follow instead of giving other results. Mochi's processor stand-in is tested in tests/test_pipelines.py.
HiDream (its experts' routing), Wan-Animate-2 (its reference pass), OmniGen (its RoPE's choice of
scaling factors) and GlmImage (its dropped prior tokens) are checked in this process only,
against the stock model and on the simulated world; Wan-Animate-2's cross-attention to the text and
CLIP tokens is local (its queries split, its keys whole on every rank), as in Wan.
"""

import copy
import functools
import math

import pytest
import torch

import para_fx
from para_fx.adapters.traceable import make_traceable
import ranks

TOLERANCE = 1e-5
SPLIT = {"ulysses", "ring", "hybrid"}


def lumina2(text_valid=(7, 4, 0), text_len=7, height=10, width=10, refiners=1):
    """Lumina2Transformer2DModel with grouped-query attention (3 heads, 1 key/value head); one
    sample per entry of ``text_valid``, its text mask a prefix of that many valid tokens. 10x10
    latents give 25 image tokens, so neither sequence splits evenly over 2 ranks."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    model = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_refiner_layers=refiners,
        num_attention_heads=3, num_kv_heads=1, multiple_of=2, norm_eps=1e-5, axes_dim_rope=(4, 2, 2),
        axes_lens=(32, 32, 32), cap_feat_dim=32,
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    batch = len(text_valid)
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        timestep=torch.rand(batch, generator=g),
        encoder_attention_mask=torch.arange(text_len) < torch.tensor(text_valid)[:, None],
    )
    return model, kwargs


def z_image(text_lens=(7, 40), height=10, width=14, refiners=1):
    """ZImageTransformer2DModel; one sample per entry of ``text_lens``. Unequal caption lengths pad
    to unequal multiples of 32 (32 and 64 tokens), so the model masks its attention."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1, n_refiner_layers=refiners,
        n_heads=1, n_kv_heads=1, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[128, 32, 32],
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        x=[torch.randn(16, 1, height, width, generator=g) for _ in text_lens],
        cap_feats=[torch.randn(n, 16, generator=g) for n in text_lens],
        t=torch.rand(len(text_lens), generator=g),
    )
    return model, kwargs


def hunyuan_video15(text_valid=(7, 2), text_2_valid=(5, 3), refiners=1):
    """HunyuanVideo15Transformer3DModel with image embeddings (image-to-video); one sample per entry
    of ``text_valid`` and ``text_2_valid``, its MLLM and ByT5 text masks prefixes of that many valid
    tokens. 5x5 latents give 25 video tokens, which do not split evenly over 2 ranks."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=refiners, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    batch = len(text_valid)
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, 1, 5, 5, generator=g),
        timestep=torch.rand(batch, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, 16, generator=g),
        encoder_attention_mask=(torch.arange(7) < torch.tensor(text_valid)[:, None]).float(),
        encoder_hidden_states_2=torch.randn(batch, 5, 8, generator=g),
        encoder_attention_mask_2=(torch.arange(5) < torch.tensor(text_2_valid)[:, None]).float(),
        image_embeds=torch.randn(batch, 3, 12, generator=g),
    )
    return model, kwargs


def framepack(text_valid=(6, 3), double_layers=1, single_layers=1, refiners=1):
    """HunyuanVideoFramepackTransformer3DModel with clean, 2x and 4x history latents; one sample per
    entry of ``text_valid``, its text mask a prefix of that many valid tokens. 12 latent tokens and
    6 + 2 + 1 history tokens: 21, which do not split evenly over 2 ranks."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=double_layers,
        num_single_layers=single_layers, num_refiner_layers=refiners, patch_size=2, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True, image_proj_dim=16,
        has_clean_x_embedder=True, guidance_embeds=False,
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    batch = len(text_valid)
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, 2, 4, 6, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
        encoder_attention_mask=(torch.arange(6) < torch.tensor(text_valid)[:, None]).float(),
        pooled_projections=torch.randn(batch, 8, generator=g),
        image_embeds=torch.randn(batch, 3, 16, generator=g),
        indices_latents=torch.arange(2.0) + 3,
        latents_clean=torch.randn(batch, 4, 1, 4, 6, generator=g),
        indices_latents_clean=torch.tensor([2.0]),
        latents_history_2x=torch.randn(batch, 4, 2, 4, 6, generator=g),
        indices_latents_history_2x=torch.tensor([0.0, 1.0]),
        latents_history_4x=torch.randn(batch, 4, 4, 4, 6, generator=g),
        indices_latents_history_4x=torch.arange(4.0) - 4,
    )
    return model, kwargs


def hidream(batch=2, height=8, width=8, double_layers=1, single_layers=1):
    """HiDreamImageTransformer2DModel whose feed-forwards route each token to 2 of 4 experts; one sample
    per batch entry. 8x8 latents give 16 image tokens, and the text 5 (T5) + 3 + 3 (Llama) more: 27,
    which do not split evenly over 2 ranks. Latents that are not square are padded to the model's
    largest size (64 tokens), with a mask."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=double_layers, num_single_layers=single_layers,
        attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
        llama_layers=tuple(range(double_layers + single_layers)), force_inference_output=True,
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        timesteps=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states_t5=torch.randn(batch, 5, 8, generator=g),
        encoder_hidden_states_llama3=torch.randn(double_layers + single_layers, batch, 3, 4, generator=g),
        pooled_embeds=torch.randn(batch, 8, generator=g),
    )
    return model, kwargs


def wan_animate2(grids=((1, 3, 3), (3, 1, 3)), layers=2, **config):
    """WanAnimate2Transformer3DModel's reference pass (``kv_cache_mode="extract"``, which fills the
    cache the generation pass reads); one sample per patch grid (frames, rows, columns). The default
    grids differ but hold the same 9 tokens (the model needs that), which do not split evenly over 2
    ranks. The reference RoPE offsets are the defaults: the width's is read from ``offset_grid_sizes``."""
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    torch.manual_seed(0)
    model = WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=16, in_dim=36, dim=48, ffn_dim=64, freq_dim=16, text_dim=32, out_dim=16,
        num_heads=2, num_layers=layers, **config,
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=[torch.randn(16, f, 2 * h, 2 * w, generator=g) for f, h, w in grids],
        condition_latents=[torch.randn(20, f, 2 * h, 2 * w, generator=g) for f, h, w in grids],
        timestep=torch.tensor([1.0]),
        encoder_hidden_states=[torch.randn(8, 32, generator=g) for _ in grids],
        encoder_hidden_states_image=torch.randn(len(grids), 4, 1280, generator=g),
        kv_cache=WanAnimate2KVCache(layers),
        kv_cache_mode="extract",
        seq_len=math.prod(grids[0]),
        offset_grid_sizes=torch.tensor([grids[0]]),
    )
    return model, kwargs


def omnigen(batch=2, layers=1, original_max_positions=4096):
    """OmniGenTransformer2DModel with an input image in the first sample's condition tokens; one
    sample per batch entry. 24 condition tokens, the time token and 16 image tokens: 41, which do not
    split evenly over 2 ranks. RoPE takes the long scaling factors where the largest position + 1 (41)
    is above ``original_max_positions``, the short ones otherwise; the two differ. The mask is
    OmniGen's: causal, with the image tokens attending to each other; the second sample's positions
    start 3 tokens late, as after left padding (the stock RoPE takes the first sample's for all)."""
    from diffusers import OmniGenTransformer2DModel

    torch.manual_seed(0)
    model = OmniGenTransformer2DModel(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=layers,
        pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=4,
        original_max_position_embeddings=original_max_positions,
        rope_scaling={"long_factor": [1.0, 3.0], "short_factor": [2.0, 0.5]},
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    length = 24 + 1 + 16
    mask = torch.ones(length, length).tril()
    mask[-16:, -16:] = 1.0
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.rand(batch, generator=g),
        input_ids=torch.randint(0, 100, (batch, 24), generator=g),
        input_img_latents=[torch.randn(1, 4, 8, 8, generator=g)],
        input_image_sizes={0: [[2, 18]]},
        attention_mask=mask.expand(batch, -1, -1).clone(),
        position_ids=(torch.arange(length) - 3 * torch.arange(batch)[:, None]).clamp(min=0),
    )
    return model, kwargs


def glm_image(batch=1, prior_tokens=False, drop=(False,)):
    """GlmImageTransformer2DModel; one sample per batch entry, ``drop`` says which samples' prior
    tokens are dropped. Diffusers' test gives one prior token per sample (which only broadcasts
    over the image tokens at batch 1), the pipeline one per image token (``prior_tokens``). 8x8
    latents give 16 image tokens, and the text 12: 28, split over 2 ranks."""
    from diffusers import GlmImageTransformer2DModel

    torch.manual_seed(0)
    model = GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64,
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    prior_shape = (batch, 16) if prior_tokens else (batch,)
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 12, 32, generator=g),
        prior_token_id=torch.randint(0, 64, prior_shape, generator=g),
        prior_token_drop=torch.tensor(drop).view(-1, *[1] * (len(prior_shape) - 1)).expand(prior_shape),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        target_size=torch.tensor([[8.0, 8.0]] * batch),
        crop_coords=torch.tensor([[0.0, 0.0]] * batch),
    )
    return model, kwargs


def sample(output) -> torch.Tensor:
    """The model's output as one tensor (Z-Image returns a list, one image per sample)."""
    images = output[0]
    return torch.stack(images) if isinstance(images, list) else images


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def made_traceable(model, changed):
    """``model`` as it was, after checking that make_traceable changes ``changed`` on it, once."""
    stock = copy.deepcopy(model)
    assert make_traceable(model) == changed
    assert make_traceable(model) == []
    return stock


def assert_one_site_split_once_traceable(model, kwargs):
    """The cheapest config that still has the breaks: one graph, its one attention site split."""
    make_traceable(model)
    report = assert_one_graph_all_split(model, kwargs)
    assert len(report.attention_sites) == 1


def assert_one_graph_all_split(model, kwargs):
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    assert report.graph_count == 1
    assert report.attention_sites and {site.strategy for site in report.attention_sites} <= SPLIT
    assert not [f for f in report.fallbacks if report.in_blocks(f.module)]
    assert not [c for c in report.collectives if c.kind.startswith("all_gather") and report.in_blocks(c.module)]
    return report


def test_lumina2_one_graph_equal_outputs_and_prefix_masks_only():
    model, kwargs = lumina2()
    stock = made_traceable(model, ["forward"])
    assert "forward" not in vars(stock)  # the instance is changed, not the class
    with torch.no_grad():
        expected = sample(stock(**kwargs, return_dict=False))
        assert expected.isfinite().all()
        assert max_error(sample(model(**kwargs, return_dict=False)), expected) <= TOLERANCE
        # every sample with the same text length: the stock model attends without a mask
        equal_lengths = dict(kwargs, encoder_attention_mask=torch.ones_like(kwargs["encoder_attention_mask"]))
        assert max_error(model(**equal_lengths).sample, stock(**equal_lengths).sample) <= TOLERANCE

    # a valid token after a padded one: the stock model would take the first mask.sum() tokens
    shuffled = dict(kwargs, encoder_attention_mask=kwargs["encoder_attention_mask"].clone())
    shuffled["encoder_attention_mask"][1, 0] = False
    refused = "Lumina2 text attention mask has a valid token after a padded one"
    with torch.no_grad(), pytest.raises(RuntimeError, match=refused):
        model(**shuffled)

    # the graph breaks were in the forward, around the blocks (the refiners' attention is
    # structure bench/model_coverage.py records): the cheaper trace, with the joint block only
    model, kwargs = lumina2(refiners=0)
    assert_one_site_split_once_traceable(model, kwargs)


def test_z_image_one_graph_equal_outputs():
    model, kwargs = z_image()
    stock = made_traceable(model, ["rope_embedder"])
    with torch.no_grad():
        expected = sample(stock(**kwargs, return_dict=False))
        assert max_error(sample(model(**kwargs, return_dict=False)), expected) <= TOLERANCE

    # the break is in the RoPE of every sequence, which runs without refiner blocks too (the
    # refiners' attention is structure bench/model_coverage.py records): the cheaper trace
    model, kwargs = z_image(refiners=0)
    assert_one_site_split_once_traceable(model, kwargs)


def test_hunyuan_video15_one_graph_equal_outputs_for_any_masks():
    model, kwargs = hunyuan_video15()
    stock = made_traceable(model, ["forward", "transformer_blocks.0.attn"])
    # holes in the masks, not only padding: the stock model gathers the valid tokens by boolean
    # indexing, so any mask is followed and none is refused; the first sample has no valid MLLM
    # token (the refiner gives it NaN, which must not reach the outputs)
    holes = dict(kwargs, encoder_attention_mask=1 - kwargs["encoder_attention_mask"])
    holes["encoder_attention_mask_2"] = kwargs["encoder_attention_mask_2"].flip(1)
    # text-to-video (all image embeddings zero: the image tokens are masked out), and a batch where
    # one sample's are zero (the stock test is over the whole batch: the image tokens stay)
    text_to_video = dict(holes, image_embeds=torch.zeros_like(kwargs["image_embeds"]))
    one_zero_image = dict(kwargs, image_embeds=kwargs["image_embeds"] * torch.tensor([0.0, 1.0])[:, None, None])
    with torch.no_grad():
        for inputs in (kwargs, holes, text_to_video, one_zero_image):
            expected = sample(stock(**inputs, return_dict=False))
            assert expected.isfinite().all()
            assert max_error(sample(model(**inputs, return_dict=False)), expected) <= TOLERANCE

    # both breaks (the text-to-video branch, the reordering of the condition tokens) are in the
    # forward, with or without refiner blocks: the cheaper trace
    model, kwargs = hunyuan_video15(text_valid=(7,), text_2_valid=(3,), refiners=0)
    assert_one_site_split_once_traceable(model, kwargs)


def test_framepack_one_graph_equal_outputs_and_prefix_masks_only():
    model, kwargs = framepack()
    stock = made_traceable(model, ["forward"])
    # batch 1 (the stock model cuts the text to its valid length) and 2 (it masks the keys)
    one_sample = {name: value if name.startswith("indices") else value[1:] for name, value in kwargs.items()}
    with torch.no_grad():
        for inputs in (kwargs, one_sample):
            expected = sample(stock(**inputs, return_dict=False))
            assert expected.isfinite().all()
            assert max_error(sample(model(**inputs, return_dict=False)), expected) <= TOLERANCE

    # a valid token after a padded one: the stock model would take the first mask.sum() tokens
    shuffled = dict(kwargs, encoder_attention_mask=kwargs["encoder_attention_mask"].flip(1))
    refused = "Framepack text attention mask has a valid token after a padded one"
    with torch.no_grad(), pytest.raises(RuntimeError, match=refused):
        model(**shuffled)

    # the break is in the forward at every batch size: the cheaper trace, one single-stream block
    model, kwargs = framepack(text_valid=(3,), double_layers=0, refiners=0)
    assert_one_site_split_once_traceable(model, kwargs)


def test_hidream_one_graph_equal_outputs_same_experts():
    model, kwargs = hidream()
    moe = ["double_stream_blocks.0.block.ff_i.forward", "single_stream_blocks.0.block.ff_i.forward"]
    stock = made_traceable(model, ["forward", *moe])
    with torch.no_grad():
        # every expert gets some tokens, none gets them all: the dense feed-forward must weigh the
        # experts the gate chose, and only those
        ff, stock_ff = model.double_stream_blocks[0].block.ff_i, stock.double_stream_blocks[0].block.ff_i
        tokens = torch.randn(2, 16, model.inner_dim, generator=torch.Generator().manual_seed(1))
        counts = torch.bincount(ff.gate(tokens)[0].flatten(), minlength=4)
        assert (counts > 0).all() and (counts < 32).all(), counts
        assert max_error(ff(tokens), stock_ff(tokens)) <= TOLERANCE
        # batch 2 and 1, and latents that are not square (padded to the largest size, masked as keys)
        one_sample = {k: v[:, :1] if k == "encoder_hidden_states_llama3" else v[:1] for k, v in kwargs.items()}
        not_square = dict(kwargs, hidden_states=kwargs["hidden_states"][..., :4])
        for inputs in (kwargs, one_sample, not_square):
            expected = stock(**inputs, return_dict=False)[0]
            assert max_error(model(**inputs, return_dict=False)[0], expected) <= TOLERANCE

    # the breaks are in every feed-forward and in the output: one double- and one single-stream block
    report = assert_one_graph_all_split(model, kwargs)
    assert [site.strategy for site in report.attention_sites] == ["ulysses", "ulysses"]


def test_wan_animate2_reference_pass_one_graph_equal_outputs_and_cache():
    for config in ({}, dict(refer_stride=2, refer_offset_t=3, refer_offset_h=-1)):
        model, kwargs = wan_animate2(**config)
        stock = made_traceable(model, ["forward", "blocks.0.self_attn", "blocks.1.self_attn"])
        # the pass's product is the cache (keys and values before RoPE) as much as the output
        runs = []
        with torch.no_grad():
            for m in (stock, model):
                inputs = dict(kwargs, kv_cache=copy.deepcopy(kwargs["kv_cache"]))
                runs.append((m(**inputs, return_dict=False)[0], inputs["kv_cache"].layer_caches))
        (expected, expected_cache), (output, cache) = runs
        assert len(output) == len(expected) == 2
        for a, b in zip(output, expected):
            assert max_error(a, b) <= TOLERANCE
        for a, b in zip(cache, expected_cache):
            assert max_error(a.key, b.key) <= TOLERANCE and max_error(a.value, b.value) <= TOLERANCE

    # the breaks are in every block's RoPE and around the blocks: one block; the cross-attention
    # (text and CLIP keys, whole on every rank) is local
    model, kwargs = wan_animate2(grids=((1, 3, 3),), layers=1)
    make_traceable(model)
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    assert report.graph_count == 1
    sites = sorted((site.module, site.strategy) for site in report.attention_sites)
    assert sites == [("blocks.0.cross_attn", "local")] * 2 + [("blocks.0.self_attn", "ulysses")]
    assert not [f for f in report.fallbacks if report.in_blocks(f.module)]
    assert not [c for c in report.collectives if c.kind.startswith("all_gather") and report.in_blocks(c.module)]


def test_omnigen_one_graph_equal_outputs_long_and_short_rope():
    # 41 positions: the long scaling factors above 32, the short ones below 4096
    for original_max_positions in (32, 4096):
        model, kwargs = omnigen(original_max_positions=original_max_positions)
        stock = made_traceable(model, ["forward"])
        one_sample = {k: v[:1] if torch.is_tensor(v) else v for k, v in kwargs.items()}
        with torch.no_grad():
            for inputs in (kwargs, one_sample):
                expected = sample(stock(**inputs, return_dict=False))
                assert max_error(sample(model(**inputs, return_dict=False)), expected) <= TOLERANCE

    # the break was in the RoPE, before the blocks: one block; the RoPE factors in the sequence's
    # pieces, so nothing is gathered, not even the output's image tokens
    report = assert_one_graph_all_split(model, kwargs)
    assert [site.strategy for site in report.attention_sites] == ["ulysses"]
    assert not report.fallbacks and not [c for c in report.collectives if c.kind.startswith("all_gather") and c.module]


def test_glm_image_one_graph_equal_outputs_dropped_prior_tokens():
    model, kwargs = glm_image()
    stock = made_traceable(model, ["forward"])
    # one prior token per sample (diffusers' test) at batch 1, dropped or not; one per image token
    # (the pipeline's) at batch 2, dropped in one sample
    pipeline_like = glm_image(batch=2, prior_tokens=True, drop=(True, False))[1]
    with torch.no_grad():
        for inputs in (kwargs, dict(kwargs, prior_token_drop=~kwargs["prior_token_drop"]), pipeline_like):
            expected = sample(stock(**inputs, return_dict=False))
            assert max_error(sample(model(**inputs, return_dict=False)), expected) <= TOLERANCE

    # an integer tensor indexes rows in the stock code, not a mask
    with torch.no_grad(), pytest.raises(ValueError, match="boolean `prior_token_drop`"):
        model(**dict(kwargs, prior_token_drop=kwargs["prior_token_drop"].long()))

    report = assert_one_graph_all_split(model, kwargs)
    assert [site.strategy for site in report.attention_sites] == ["ulysses"]


def all_on_this_rank():
    """On one rank: each model made traceable and compiled over all ranks (Ulysses), against eager.
    Z-Image's two samples are padded into a batch by ``pad_sequence`` (see tests/test_shard.py).
    Each model in the config whose structure the tests above read (the cheaper trace, 1 to 4 s of
    CPU per rank): Lumina2 and Z-Image without refiner blocks (compiled on a simulated mesh: 3.7 and
    5.3 s of CPU with one each, 1.2 and 2.3 without), whose joint block attends to the padded text
    and the uneven image tokens together; HunyuanVideo 1.5 without refiner blocks and Framepack with
    one single-stream block: the refiners and the double-stream blocks are HunyuanVideo's, checked in
    tests/test_shard.py. The refiners' attention, on the text or the image tokens alone, is the
    structure bench/model_coverage.py records; with them each model is checked against the stock one
    above."""
    errors = {}
    for name, factory in (
        ("lumina2", functools.partial(lumina2, refiners=0)),
        ("z_image", functools.partial(z_image, refiners=0)),
        ("hunyuan_video15", functools.partial(hunyuan_video15, refiners=0)),
        ("framepack", functools.partial(framepack, double_layers=0, refiners=0)),
    ):
        model, kwargs = factory()
        make_traceable(model)
        compiled = torch.compile(model, backend=para_fx.backend(mesh=para_fx.init_mesh(), compiler="eager"))
        with torch.no_grad():
            errors[name] = max_error(sample(compiled(**kwargs, return_dict=False)), sample(model(**kwargs, return_dict=False)))
        torch._dynamo.reset()
    return errors


ranks.add(2, "traceable models", all_on_this_rank)


@pytest.mark.ranks
def test_outputs_on_two_ranks_match_one_process():
    for errors in ranks.result(2, "traceable models"):
        assert max(errors.values()) <= TOLERANCE, errors
