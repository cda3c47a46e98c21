"""FLUX.1-dev, context parallel over every GPU, with optional First Block Cache and fp8.

    torchrun --nproc_per_node=2 examples/flux.py [--cache [0.08]] [--fp8] [--steps 28] [--out flux.png]
    python examples/flux.py --tiny        # the same code on CPU: 2 ranks, random tiny components

FLUX.1-dev is guidance-distilled: one transformer call per step, so every rank works on the
sequence (Ulysses, then Ring past --max-ring). Rank 0 saves the image.
"""

import torch

import common
from para_fx.testing import tiny_pipelines


def load(args, device):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model or "black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    return pipe.to(device), dict(
        prompt=args.prompt or "A cat holding a sign that says hello world",
        num_inference_steps=args.steps or 28,
        height=args.height or 1024,
        width=args.width or 1024,
        guidance_scale=3.5,
    )


def tiny(args):
    pipe, kwargs = tiny_pipelines.flux(steps=args.steps or 3)
    del kwargs["output_type"]  # the default: PIL on rank 0
    return pipe, kwargs


EXAMPLE = common.Example("flux", load, tiny, max_ring_dim_size=2)

if __name__ == "__main__":
    common.main(EXAMPLE, __doc__)
