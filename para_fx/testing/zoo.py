"""Tiny, randomly initialised configs of real diffusers DiTs.

The zoo gives tests, examples and ``para_fx explain --example NAME`` a real
diffusers transformer to trace without downloading weights: each factory builds
the model with two blocks of each kind, 4 heads of dim 16 (hidden size 64) and
short text, and returns ``(model, kwargs)`` so that ``model(**kwargs)`` runs in
well under a second on CPU; extra keyword arguments override the diffusers
config. Model init is seeded with ``torch.manual_seed(seed)`` and inputs
with a ``torch.Generator``, so two calls with the same arguments give identical
models and inputs. Default sizes give odd image/video token counts and an odd
text length, so sharding code has to handle uneven splits.
"""

import torch

# Shared tiny sizes. HEADS * HEAD_DIM is the hidden size of every model.
HEADS = 4
HEAD_DIM = 16
TEXT_DIM = 32  # width of the (fake) text-encoder hidden states
POOLED_DIM = 32  # width of the (fake) pooled text embedding


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _finish(model):
    return model.float().eval()


def _text_mask(batch, text_len, text_pad):
    """All-ones text mask with the last `text_pad` positions marked as padding."""
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    if text_pad:
        mask[:, text_len - text_pad :] = False
    return mask


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks.
def flux(seed=0, batch=1, height=5, width=7, text_len=7, guidance=False, **config):
    """FluxTransformer2DModel (double-stream then single-stream blocks).

    FLUX takes already-packed latents [B, height*width, in_channels], so
    `height` and `width` here are the token grid: 5x7 -> 35 image tokens.
    Joint attention order is cat([txt, img]); RoPE is computed inside forward
    from `txt_ids` / `img_ids` (in float64 on CPU/CUDA). `guidance=True` builds
    the FLUX.1-dev variant.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
    )
    cfg.update(config)
    model = _finish(FluxTransformer2DModel(**cfg))

    g = _gen(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    kwargs = dict(
        hidden_states=_randn(g, batch, height * width, cfg["in_channels"]),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["joint_attention_dim"]),
        pooled_projections=_randn(g, batch, cfg["pooled_projection_dim"]),
        timestep=torch.rand(batch, generator=g),  # in [0, 1]; FLUX multiplies by 1000
        img_ids=img_ids.reshape(height * width, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )
    if cfg["guidance_embeds"]:
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks.
def hunyuan_video(seed=0, batch=1, num_frames=3, height=6, width=10, text_len=7, text_pad=0, **config):
    """HunyuanVideoTransformer3DModel (token refiner, double- then single-stream blocks).

    Latents are [B, C, T, H, W] with a 1x2x2 patch: 3x6x10 -> 3*3*5 = 45 video
    tokens. Joint attention order is cat([img, txt]) with a boolean key mask
    built from `encoder_attention_mask`; `text_pad` masks trailing text tokens.
    """
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=2,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        rope_axes_dim=(4, 6, 6),  # must sum to attention_head_dim
    )
    cfg.update(config)
    model = _finish(HunyuanVideoTransformer3DModel(**cfg))

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], num_frames, height, width),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["text_embed_dim"]),
        encoder_attention_mask=_text_mask(batch, text_len, text_pad),
        pooled_projections=_randn(g, batch, cfg["pooled_projection_dim"]),
        return_dict=False,
    )
    if cfg["guidance_embeds"]:
        kwargs["guidance"] = torch.full((batch,), 6000.0)  # pipelines pass guidance_scale * 1000
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 10 graph breaks, 11 graphs, at batch 1 and 2 (torch.nonzero).
def mochi(seed=0, batch=1, num_frames=3, height=6, width=10, text_len=7, text_pad=0, **config):
    """MochiTransformer3DModel (asymmetric joint blocks, last one context_pre_only).

    Latents are [B, C, T, H, W] with a 2x2 spatial patch (no temporal patch):
    3x6x10 -> 3*3*5 = 45 video tokens. Attention runs per sample in a Python
    loop over the batch, drops masked text tokens with torch.nonzero, then
    pads the output back; order is cat([img, txt]). Under torch.compile the
    nonzero makes Dynamo fall back to eager for the whole attention processor:
    its q/k/v/out projections and per-sample SDPA run outside every graph (the
    q/k RMSNorms and RoPE it calls become small graphs of their own), unless
    torch._dynamo.config.capture_dynamic_output_shape_ops is True, which gives
    one graph. The text stream has its own width (`pooled_projection_dim`).
    `pos_frequencies` is zero-initialised in diffusers (RoPE would be the
    identity), so it is re-drawn randomly here.
    """
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(
        patch_size=2,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        pooled_projection_dim=POOLED_DIM,
        in_channels=4,
        text_embed_dim=TEXT_DIM,  # must be divisible by 8 (attention pool heads)
        time_embed_dim=32,
        max_sequence_length=text_len,
    )
    cfg.update(config)
    model = MochiTransformer3DModel(**cfg)
    with torch.no_grad():
        model.pos_frequencies.normal_(0.0, 0.5)
    model = _finish(model)

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], num_frames, height, width),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["text_embed_dim"]),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_attention_mask=_text_mask(batch, text_len, text_pad),
        return_dict=False,
    )
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks (both rotary=True and rotary=False).
def cogvideox(seed=0, batch=1, num_frames=3, height=6, width=10, text_len=7, rotary=True, **config):
    """CogVideoXTransformer3DModel (expert-adaLN joint blocks).

    Latents are [B, T, C, H, W] (frames before channels) with a 2x2 spatial
    patch: 3x6x10 -> 3*3*5 = 45 video tokens. Attention order is
    cat([txt, img]). With `rotary=True` (CogVideoX-5b style) the 3D RoPE is
    precomputed here, as the pipeline does, and passed in as
    `image_rotary_emb=(cos, sin)`, each [num_video_tokens, head_dim];
    with `rotary=False` (CogVideoX-2b style) a sin-cos position table of
    length text_len + video tokens is added after patch embedding.
    """
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(seed)
    temporal_compression = 4
    cfg = dict(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        sample_width=width,
        sample_height=height,
        sample_frames=(num_frames - 1) * temporal_compression + 1,
        patch_size=2,
        temporal_compression_ratio=temporal_compression,
        max_text_seq_length=text_len,  # the sin-cos table assumes exactly this many text tokens
        use_rotary_positional_embeddings=rotary,
    )
    cfg.update(config)
    model = _finish(CogVideoXTransformer3DModel(**cfg))

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, num_frames, cfg["in_channels"], height, width),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["text_embed_dim"]),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        return_dict=False,
    )
    if cfg["use_rotary_positional_embeddings"]:
        p = cfg["patch_size"]
        gh, gw = height // p, width // p
        kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=cfg["attention_head_dim"],
            crops_coords=((0, 0), (gh, gw)),
            grid_size=(gh, gw),
            temporal_size=num_frames,
        )
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks.
def wan(seed=0, batch=1, num_frames=3, height=6, width=10, text_len=7, **config):
    """WanTransformer3DModel (Wan 2.1 T2V: self-attn + cross-attn to text).

    Latents are [B, C, T, H, W] with a 1x2x2 patch: 3x6x10 -> 3*3*5 = 45
    video tokens. Text is only attended to through cross-attention, so the
    self-attention sequence is video tokens only; the RoPE table is a buffer
    of `rope_max_seq_len` rows per axis, sliced in forward.
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,  # RoPE splits it t/h/w = 8/4/4
        in_channels=4,
        out_channels=4,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=128,
        num_layers=2,
        rope_max_seq_len=64,
    )
    cfg.update(config)
    model = _finish(WanTransformer3DModel(**cfg))

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], num_frames, height, width),
        timestep=torch.randint(0, 1000, (batch,), generator=g).float(),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["text_dim"]),
        return_dict=False,
    )
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks.
def sd3(seed=0, batch=1, height=10, width=14, text_len=7, **config):
    """SD3Transformer2DModel, SD3.5-style (RMS qk-norm, dual attention in block 0).

    Latents are [B, C, H, W] with a 2x2 patch: 10x14 -> 5*7 = 35 image
    tokens. Joint attention order is cat([img, txt]); the last block is
    context_pre_only. Block 0 also runs an image-only self-attention (attn2).
    Pass `qk_norm=None, dual_attention_layers=()` for SD3.0.
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=HEADS * HEAD_DIM,  # must equal the hidden size
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=16,  # latent height/width must be <= 16 * patch_size
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    cfg.update(config)
    model = _finish(SD3Transformer2DModel(**cfg))

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], height, width),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["joint_attention_dim"]),
        pooled_projections=_randn(g, batch, cfg["pooled_projection_dim"]),
        timestep=torch.randint(0, 1000, (batch,), generator=g).float(),
        return_dict=False,
    )
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks.
def pixart(seed=0, batch=2, height=10, width=14, text_len=7, **config):
    """PixArtTransformer2DModel (PixArt-alpha: self-attention, cross-attention to text, adaLN-single).

    Latents are [B, C, H, W] with a 2x2 patch: 10x14 -> 5*7 = 35 image tokens. Batch 2 by
    default (the CFG batch): its attention projections run on flattened [B*S, D] rows.
    """
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,  # learned sigma: twice the latent channels
        num_layers=2,
        cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=TEXT_DIM,
        sample_size=16,  # not 128: no resolution / aspect-ratio conditioning
        patch_size=2,
        norm_type="ada_norm_single",
    )
    cfg.update(config)
    model = _finish(PixArtTransformer2DModel(**cfg))

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], height, width),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["caption_channels"]),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks.
def dit(seed=0, batch=2, size=10, **config):
    """DiTTransformer2DModel (class-conditional DiT, adaLN-Zero).

    Latents are [B, C, size, size] with a 2x2 patch: 10x10 -> 25 image tokens. Batch 2 by
    default (the CFG batch): its attention projections run on flattened [B*S, D] rows.
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=size,
        patch_size=2,
        num_embeds_ada_norm=10,  # classes
    )
    cfg.update(config)
    model = _finish(DiTTransformer2DModel(**cfg))

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], size, size),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        class_labels=torch.randint(0, cfg["num_embeds_ada_norm"], (batch,), generator=g),
        return_dict=False,
    )
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks.
def qwen_image(seed=0, batch=1, height=5, width=7, text_len=7, **config):
    """QwenImageTransformer2DModel (double-stream blocks, complex RoPE).

    Takes packed latents [B, height*width, in_channels]: 5x7 -> 35 image tokens. Joint attention
    order is cat([txt, img]); q and k are rotated as complex numbers (view_as_complex, a complex
    multiply, view_as_real) by a table the model builds from `img_shapes`.
    """
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
    )
    cfg.update(config)
    model = _finish(QwenImageTransformer2DModel(**cfg))

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, height * width, cfg["in_channels"]),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["joint_attention_dim"]),
        timestep=torch.rand(batch, generator=g),
        img_shapes=[[(1, height, width)]] * batch,
        return_dict=False,
    )
    return model, kwargs


# Dynamo (torch 2.13, diffusers 0.42.1): 0 graph breaks.
def sana(seed=0, batch=1, height=16, width=16, text_len=7, **config):
    """SanaTransformer2DModel (linear self-attention, cross-attention to text, a depthwise 3x3
    convolution over the image grid in each block's feed-forward).

    Latents are [B, C, H, W] with a 1x1 patch: 16x16 -> 256 image tokens, 16 rows of 16, so 2 or 4
    ranks hold whole rows (the convolution then exchanges one border row with each neighbour).
    """
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=TEXT_DIM,
        sample_size=height,
    )
    cfg.update(config)
    model = _finish(SanaTransformer2DModel(**cfg))

    g = _gen(seed)
    kwargs = dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], height, width),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["caption_channels"]),
        timestep=torch.randint(0, 1000, (batch,), generator=g).float(),
        return_dict=False,
    )
    return model, kwargs


FACTORIES = {
    "flux": flux,
    "hunyuan_video": hunyuan_video,
    "mochi": mochi,
    "cogvideox": cogvideox,
    "wan": wan,
    "sd3": sd3,
    "pixart": pixart,
    "dit": dit,
    "qwen_image": qwen_image,
    "sana": sana,
}
