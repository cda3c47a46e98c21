# torchrun --nproc_per_node=2 examples/pipeline.py [--tiny]   (--tiny: random tiny components on CPU, no download)
import sys

import torch
import torch.distributed as dist
from diffusers import FluxPipeline

from para_fx.adapters.diffusers import (apply_cache_on_pipe, init_context_parallel_mesh,
                                        last_cache_stats, parallelize_pipe, parallelize_vae)
from para_fx.testing import tiny_pipelines

dist.init_process_group()
if "--tiny" in sys.argv:
    pipe, call = tiny_pipelines.flux(steps=4)      # FLUX's pipeline and model classes, 2+2 blocks, prompt embeddings given
    del call["output_type"]                        # PIL images on rank 0, as for the real model
    compile_options = dict(compiler="aot_eager")   # a CPU check: the passes without Inductor's C++ builds
else:
    torch.cuda.set_device(dist.get_rank())
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    call = dict(prompt="A cat holding a sign that says hello world", num_inference_steps=28)
    compile_options = dict(mode="max-autotune-no-cudagraphs")
mesh = init_context_parallel_mesh(pipe.device.type, max_ring_dim_size=2)
parallelize_pipe(pipe, mesh=mesh, **compile_options)                  # compiles pipe.transformer with the para backend
parallelize_vae(pipe.vae, mesh=mesh)                                   # exact parallel decode
apply_cache_on_pipe(pipe, residual_diff_threshold=0.12)                # First Block Cache, one session per call
image = pipe(**call).images[0]
if dist.get_rank() == 0:
    image.save("flux.png")
    print(f"saved flux.png ({image.width}x{image.height}); cache: {last_cache_stats(pipe)}")
dist.destroy_process_group()
