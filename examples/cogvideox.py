"""CogVideoX-5b, context parallel over every GPU, with optional First Block Cache and fp8.

    torchrun --nproc_per_node=2 examples/cogvideox.py [--cache [0.08]] [--fp8] [--steps 50] [--out cogvideox.mp4]
    python examples/cogvideox.py --tiny        # the same code on CPU: 2 ranks, random tiny components

CogVideoX batches the conditional and unconditional inputs in one transformer call, so by
default 2 ranks split that batch (CFG parallelism, --max-batch 2) and the rest split the sequence.
"""

import torch

import common
from para_fx.testing import tiny_pipelines


def load(args, device):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(args.model or "THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16)
    pipe.vae.enable_tiling()  # bounds one device's decode memory; a parallel VAE call splits rows instead
    return pipe.to(device), dict(
        prompt=args.prompt or "A panda, dressed in a small red jacket, playing a guitar in a bamboo forest.",
        num_inference_steps=args.steps or 50,
        height=args.height or 480,
        width=args.width or 720,
        num_frames=args.frames or 49,
        guidance_scale=6.0,
    )


def tiny(args):
    pipe, kwargs = tiny_pipelines.cogvideox(steps=args.steps or 3)
    del kwargs["output_type"]
    return pipe, kwargs


EXAMPLE = common.Example("cogvideox", load, tiny, fps=8, max_batch_dim_size=2)

if __name__ == "__main__":
    common.main(EXAMPLE, __doc__)
