"""A diffusion transformer in plain PyTorch (no diffusers), context parallel with para-fx.

    torchrun --nproc_per_node=4 examples/plain_dit.py [--cache [0.08]] [--fp8] [--steps 28] [--out plain_dit.pt]
    python examples/plain_dit.py --tiny        # CPU: 2 ranks, a tiny config, checked against eager

Nothing here is written for para-fx: the model is an ordinary class-conditional DiT (adaLN-Zero
blocks, one F.scaled_dot_product_attention each) and the sampler an ordinary flow-matching
Euler loop with classifier-free guidance, conditional and unconditional batched in one call.
para-fx enters in three lines: a mesh, torch.compile with the para backend, and (with --cache)
a cache session per generation. The weights are random (this shows speed, not pictures), so the
output is the final latent tensor, saved by rank 0.
"""

import contextlib
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import para_fx
from para_fx.adapters.diffusers import init_context_parallel_mesh


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + gate1 * self.proj(h)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """Latent [B, C, H, W] -> velocity of the same shape; ``label == classes`` means no class."""

    def __init__(self, height: int, width: int, channels=4, patch=2, dim=1152, depth=28, heads=16, classes=1000):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.patchify = nn.Conv2d(channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, (height // patch) * (width // patch), dim) * 0.02)
        self.time = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(classes + 1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, latent: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = latent.shape
        x = self.patchify(latent).flatten(2).transpose(1, 2) + self.position
        cond = self.time(sinusoidal(t, 256)) + self.label(label)
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.final_modulation(F.silu(cond))[:, None].chunk(2, dim=-1)
        x = self.out(self.final_norm(x) * (1 + scale) + shift)
        p, rows, cols = self.patch, height // self.patch, width // self.patch
        x = x.view(batch, rows, cols, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, self.channels, height, width)


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    angles = t[:, None].float() * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@torch.no_grad()
def sample(model, args, device, dtype, label=207, guidance=4.0):
    """Flow-matching Euler from noise (t=1) to data (t=0), with CFG batched in one call."""
    generator = torch.Generator(device).manual_seed(args.seed)
    latent = torch.randn(1, 4, args.height, args.width, generator=generator, device=device, dtype=dtype)
    labels = torch.tensor([label, 1000], device=device)
    times = torch.linspace(1.0, 0.0, args.steps + 1, device=device)
    for i in range(args.steps):
        t = times[i].expand(2) * 1000
        v_cond, v_uncond = model(torch.cat([latent, latent]), t, labels).chunk(2)
        latent = latent + (times[i + 1] - times[i]) * (v_uncond + guidance * (v_cond - v_uncond))
    return latent


def run(args):
    device = common.device_of(args)
    if args.tiny and dist.is_initialized():
        torch.set_num_threads(1)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    args.steps = args.steps or (4 if args.tiny else 28)
    args.height = args.height or (10 if args.tiny else 128)  # latent size: 128 -> 4096 tokens
    args.width = args.width or (14 if args.tiny else 128)
    size = dict(dim=64, depth=2, heads=4) if args.tiny else {}
    torch.manual_seed(0)  # the same random weights on every rank
    model = DiT(args.height, args.width, **size).to(device, dtype).eval()
    if args.fp8:
        common.quantize_fp8(model)

    mesh = init_context_parallel_mesh(device.split(":")[0], max_batch_dim_size=args.max_batch, max_ring_dim_size=args.max_ring)
    cache = para_fx.FirstBlockCache(threshold=args.cache) if args.cache is not None else None
    compiled = torch.compile(
        model,
        backend=para_fx.backend(mesh=mesh, cache=cache, compiler=args.compiler),
        **({"mode": args.mode} if args.mode else {}),
    )
    common.log(f"[plain_dit] mesh {dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh else 'single device'}")
    for run_index in range(args.runs):
        begin = time.perf_counter()
        with para_fx.cache_session(cache) if cache else contextlib.nullcontext():
            latent = sample(compiled, args, device, dtype)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        label = "warm-up run (compiles)" if run_index == 0 else f"run {run_index + 1}"
        common.log(f"[plain_dit] {label}: {time.perf_counter() - begin:.2f} s")
        if cache:
            stats = para_fx.cache_stats(cache)
            common.log(f"[plain_dit]   cache: {stats.computed} computed, {stats.skipped} skipped of {stats.steps} calls")
    if args.tiny and cache is None:
        error = (latent - sample(model, args, device, dtype)).abs().max().item()
        common.log(f"[plain_dit] max abs error vs eager on one process: {error:.2e}")
        if error > 1e-4:
            raise SystemExit(f"plain_dit: parallel result differs from eager by {error}")
    if common.rank() == 0:
        torch.save(latent.cpu(), args.out)
        print(f"[plain_dit] saved {args.out}", flush=True)


if __name__ == "__main__":
    common.launch(run, common.parse_args(__doc__, "plain_dit", out_extension="pt", max_batch_dim_size=2))
