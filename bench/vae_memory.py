"""Peak activation memory of a VAE decode per rank with ``parallelize_vae``, against one device.

On CPU (default) it spawns gloo ranks, and the measure is a proxy: the largest tensor that any
module of the VAE outputs during the decode (forward hooks). On CUDA, under torchrun, it is
``torch.cuda.max_memory_allocated`` above what was allocated before the decode (weights, latent),
with the decode time. Each run decodes once on one device and once in parallel, checks that the
two agree, and prints one JSON line per rank.

    python bench/vae_memory.py --model small --latent 32 --worlds 2 4
    torchrun --nproc_per_node=2 bench/vae_memory.py --device cuda --model sd --latent 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

MODELS = {  # AutoencoderKL configurations: "sd" is the Stable Diffusion VAE architecture (random weights)
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "small": dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8),
}


def make_vae(model: str) -> nn.Module:
    from diffusers import AutoencoderKL

    config = MODELS[model]
    blocks = len(config["block_out_channels"])
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4, **config,
    ).eval()  # fmt: skip


def largest_module_output(vae: nn.Module, run) -> tuple[torch.Tensor, int]:
    """``run()``'s result and the size in bytes of the largest tensor any submodule returned."""
    largest = [0]

    def record(_module, _inputs, output):
        for value in output if isinstance(output, tuple) else (output,):
            if isinstance(value, torch.Tensor):
                largest[0] = max(largest[0], value.numel() * value.element_size())

    handles = [module.register_forward_hook(record) for module in vae.modules()]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return result, largest[0]


def peak_cuda(run) -> tuple[torch.Tensor, int, float]:
    """``run()``'s result, the peak bytes it allocated on the GPU above the baseline, and its seconds."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before, time.perf_counter() - start


def measure(model: str, latent_rows: int, device: str, dtype: str) -> dict:
    """On this rank: one-device and parallel decode of the same latent; memory, time, difference."""
    from para_fx.adapters.vae import parallelize_vae

    vae = make_vae(model).to(device)
    if dtype != "float32":
        vae = vae.to(getattr(torch, dtype))
    latent = torch.randn(1, 4, latent_rows, latent_rows, generator=torch.Generator().manual_seed(1))
    latent = latent.to(device=device, dtype=vae.dtype)
    decode = lambda: vae.decode(latent).sample  # noqa: E731
    record = {"model": model, "latent": latent_rows, "dtype": dtype, "world": dist.get_world_size(), "rank": dist.get_rank()}
    with torch.no_grad():
        for label in ("one_device", "parallel"):
            if label == "parallel":
                parallelize_vae(vae)
            if device == "cuda":
                decode()  # warm up kernels and caches
                image, peak, seconds = peak_cuda(decode)
                record[f"{label}_seconds"] = round(seconds, 4)
            else:
                image, peak = largest_module_output(vae, decode)
            record[f"{label}_peak_mib"] = round(peak / 2**20, 2)
            if label == "one_device":
                reference = image
    record["max_abs_diff"] = (image.float() - reference.float()).abs().max().item()
    record["peak_ratio"] = round(record["parallel_peak_mib"] / record["one_device_peak_mib"], 3)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="CPU rank counts to spawn")
    args = parser.parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        backend = "nccl" if args.device == "cuda" else "gloo"
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
        print(json.dumps(measure(args.model, args.latent, args.device, args.dtype)), flush=True)
        dist.destroy_process_group()
        return
    from para_fx.testing.launch import run_ranks

    for world in args.worlds:
        for record in run_ranks(measure, world, args.model, args.latent, "cpu", args.dtype, timeout=1800):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
