"""HunyuanVideo, context parallel over every GPU, with optional First Block Cache and fp8.

    torchrun --nproc_per_node=8 examples/hunyuan_video.py [--cache [0.06]] [--fp8] [--steps 30] [--out hunyuan_video.mp4]
    python examples/hunyuan_video.py --tiny        # the same code on CPU: 2 ranks, random tiny components

720p x 129 frames by default (--height, --width, --frames to change). Guidance is embedded in
the model (one transformer call per step), so every rank works on the video tokens.
"""

import torch

import common
from para_fx.testing import tiny_pipelines


def load(args, device):
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    model_id = args.model or "hunyuanvideo-community/HunyuanVideo"
    transformer = HunyuanVideoTransformer3DModel.from_pretrained(
        model_id, subfolder="transformer", torch_dtype=torch.bfloat16
    )
    pipe = HunyuanVideoPipeline.from_pretrained(model_id, transformer=transformer, torch_dtype=torch.float16)
    pipe.vae.enable_tiling()  # bounds one device's decode memory; a parallel VAE call splits rows instead
    return pipe.to(device), dict(
        prompt=args.prompt or "A cat walks on the grass, realistic",
        num_inference_steps=args.steps or 30,
        height=args.height or 720,
        width=args.width or 1280,
        num_frames=args.frames or 129,
    )


def tiny(args):
    pipe, kwargs = tiny_pipelines.hunyuan_video(steps=args.steps or 3)
    del kwargs["output_type"]
    return pipe, kwargs


EXAMPLE = common.Example("hunyuan_video", load, tiny, fps=15, cache_threshold=0.06)

if __name__ == "__main__":
    common.main(EXAMPLE, __doc__)
