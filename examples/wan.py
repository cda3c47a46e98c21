"""Wan 2.1 text-to-video, context parallel over every GPU, with optional First Block Cache and fp8.

    torchrun --nproc_per_node=4 examples/wan.py [--cache [0.08]] [--fp8] [--steps 50] [--out wan.mp4]
    python examples/wan.py --tiny        # the same code on CPU: 2 ranks, random tiny components

Wan calls the transformer twice per step (conditional, then unconditional), so every rank works
on the sequence of both calls, and the cache keeps one state per call (the pipeline names them
"cond" and "uncond"). --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers for the small model.
"""

import torch

import common
from para_fx.testing import tiny_pipelines


def load(args, device):
    from diffusers import AutoencoderKLWan, WanPipeline

    model_id = args.model or "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    vae = AutoencoderKLWan.from_pretrained(model_id, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(model_id, vae=vae, torch_dtype=torch.bfloat16)
    return pipe.to(device), dict(
        prompt=args.prompt or "A cat walks on the grass, realistic",
        num_inference_steps=args.steps or 50,
        height=args.height or 480,
        width=args.width or 832,
        num_frames=args.frames or 81,
        guidance_scale=5.0,
    )


def tiny(args):
    pipe, kwargs = tiny_pipelines.wan(steps=args.steps or 3)
    del kwargs["output_type"]
    return pipe, kwargs


EXAMPLE = common.Example("wan", load, tiny, fps=16)

if __name__ == "__main__":
    common.main(EXAMPLE, __doc__)
