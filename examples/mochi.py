"""Mochi 1 preview, context parallel over every GPU, with optional First Block Cache and fp8.

    torchrun --nproc_per_node=2 examples/mochi.py [--cache [0.06]] [--fp8] [--steps 64] [--out mochi.mp4]
    python examples/mochi.py --tiny        # the same code on CPU: 2 ranks, random tiny components

Mochi batches the conditional and unconditional inputs in one transformer call, so by default
2 ranks split that batch (CFG parallelism, --max-batch 2) and the rest split the sequence.
Mochi's stock attention drops padded text tokens per sample, which breaks the compiled graph;
parallelize_pipe swaps in an equal masked attention (para_fx.adapters.diffusers.make_traceable).
"""

import torch

import common
from para_fx.testing import tiny_pipelines


def load(args, device):
    from diffusers import MochiPipeline

    pipe = MochiPipeline.from_pretrained(
        args.model or "genmo/mochi-1-preview", variant="bf16", torch_dtype=torch.bfloat16
    )
    pipe.enable_vae_tiling()  # bounds one device's decode memory; a parallel VAE call splits rows instead
    return pipe.to(device), dict(
        prompt=args.prompt or "Close-up of a chameleon's eye, with its scaly skin changing color. Ultra high resolution 4k.",
        num_inference_steps=args.steps or 64,
        height=args.height or 480,
        width=args.width or 848,
        num_frames=args.frames or 84,
    )


def tiny(args):
    pipe, kwargs = tiny_pipelines.mochi(steps=args.steps or 3)
    del kwargs["output_type"]
    return pipe, kwargs


EXAMPLE = common.Example("mochi", load, tiny, fps=30, cache_threshold=0.06, max_batch_dim_size=2)

if __name__ == "__main__":
    common.main(EXAMPLE, __doc__)
