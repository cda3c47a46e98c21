"""Tiny, randomly initialised diffusers pipelines, runnable on CPU without downloading anything.

Each builder returns ``(pipe, call_kwargs)``: a real diffusers pipeline (FLUX, HunyuanVideo,
Mochi, CogVideoX, Wan) made of the transformers of :mod:`para_fx.testing.zoo`, a tiny VAE of the real
class and a real scheduler, with no text encoder or tokenizer: ``call_kwargs`` pass the prompt
embeddings (random, with the widths the transformer expects) directly, plus small output sizes
and a few steps. ``pipe(**call_kwargs, generator=...)`` runs end to end in seconds. Components
are seeded, so two builds with the same arguments are identical: this is what lets every rank
of a multi-process test build the same pipeline. Sizes give odd token counts (35 or 45 image /
video tokens, 7 text tokens) so that sequence sharding meets uneven splits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import zoo

TEXT_LEN = 7


def _text(seed: int, length: int = TEXT_LEN, width: int = zoo.TEXT_DIM) -> torch.Tensor:
    return torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed))


def _pooled(seed: int) -> torch.Tensor:
    return torch.randn(1, zoo.POOLED_DIM, generator=torch.Generator().manual_seed(seed))


def _padded_mask(valid: int, length: int = TEXT_LEN) -> torch.Tensor:
    """A text mask as a right-padding tokenizer makes it: ``valid`` ones, then zeros."""
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[:, :valid] = 1
    return mask


def flux(seed: int = 0, steps: int = 3) -> tuple[Any, dict[str, Any]]:
    """FluxPipeline (FLUX.1-dev style: guidance embedding, one transformer call per step).

    A 10x14 image: a 1-level AutoencoderKL (scale 1) gives 10x14 latents, packed 2x2 into 35 tokens.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer, _ = zoo.flux(seed=seed, guidance=True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=transformer.config.in_channels // 4,
        norm_num_groups=4,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_text(seed + 1),
        pooled_prompt_embeds=_pooled(seed + 2),
        height=10,
        width=14,
        num_inference_steps=steps,
        guidance_scale=3.5,
        output_type="pt",
    )
    return _quiet(pipe), kwargs


def hunyuan_video(seed: int = 0, steps: int = 3) -> tuple[Any, dict[str, Any]]:
    """HunyuanVideoPipeline (guidance embedding, one call per step); 9 frames of 48x80 -> 45 tokens."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    transformer, _ = zoo.hunyuan_video(seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=transformer.config.in_channels,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    kwargs = dict(
        prompt_embeds=_text(seed + 1),
        pooled_prompt_embeds=_pooled(seed + 2),
        prompt_attention_mask=_padded_mask(5),
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=6.0,
        output_type="pt",
    )
    return _quiet(pipe), kwargs


def mochi(seed: int = 0, steps: int = 3) -> tuple[Any, dict[str, Any]]:
    """MochiPipeline (CFG: cond and uncond batched in one call); 7 frames of 48x80 -> 30 tokens.

    The text masks are padded (5 and 3 of 7 tokens valid), so Mochi's per-sample attention
    really drops tokens.
    """
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    latent_channels = 12
    transformer, _ = zoo.mochi(seed=seed, in_channels=latent_channels)
    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(
        latent_channels=latent_channels,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_text(seed + 1),
        prompt_attention_mask=_padded_mask(5),
        negative_prompt_embeds=_text(seed + 3),
        negative_prompt_attention_mask=_padded_mask(3),
        height=48,
        width=80,
        num_frames=7,
        num_inference_steps=steps,
        guidance_scale=4.5,
        output_type="pt",
    )
    return _quiet(pipe), kwargs


def cogvideox(seed: int = 0, steps: int = 3) -> tuple[Any, dict[str, Any]]:
    """CogVideoXPipeline (5b style, RoPE; CFG batched in one call); 9 frames of 48x80 -> 45 tokens."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    transformer, _ = zoo.cogvideox(seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=transformer.config.in_channels,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    pipe = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"),
    )
    kwargs = dict(
        prompt_embeds=_text(seed + 1),
        negative_prompt_embeds=_text(seed + 3),
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=6.0,
        output_type="pt",
    )
    return _quiet(pipe), kwargs


def wan(seed: int = 0, steps: int = 3) -> tuple[Any, dict[str, Any]]:
    """WanPipeline (Wan 2.1 T2V: conditional then unconditional call every step); 9x48x80 -> 45 tokens."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    latent_channels = 16
    transformer, _ = zoo.wan(seed=seed, in_channels=latent_channels, out_channels=latent_channels)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=latent_channels,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    kwargs = dict(
        prompt_embeds=_text(seed + 1),
        negative_prompt_embeds=_text(seed + 3),
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="pt",
    )
    return _quiet(pipe), kwargs


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "flux": flux,
    "hunyuan_video": hunyuan_video,
    "mochi": mochi,
    "cogvideox": cogvideox,
    "wan": wan,
}
