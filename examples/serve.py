# python examples/serve.py     (2 ranks kept running: one per GPU with NCCL, or gloo processes on CPU)
import torch

from para_fx.adapters.diffusers import parallelize_pipe
from para_fx.runtime.runner import Runner
from para_fx.testing import tiny_pipelines


def setup(rank, world_size):                       # once per rank: load and compile
    pipe, call = tiny_pipelines.flux()             # a real model: FluxPipeline.from_pretrained(...)
    gpu = torch.cuda.is_available()
    pipe.to("cuda" if gpu else "cpu")
    parallelize_pipe(pipe, compiler="inductor" if gpu else "aot_eager")  # CPU: a check, no C++ builds
    return pipe, call


def handle(state, steps=3, seed=0):                # every request, on every rank together
    pipe, call = state
    generator = torch.Generator().manual_seed(seed)
    return pipe(**{**call, "num_inference_steps": steps}, generator=generator).images[0]


if __name__ == "__main__":                         # ranks are spawned: setup and handle must be importable
    with Runner(setup, handle, world_size=2) as runner:
        for seed in (0, 1):
            image = runner(steps=3, seed=seed)     # rank 0's result
            print(f"request {seed}: image {tuple(image.shape)}")
