"""A small class-conditional DiT trained on scikit-learn's digits, for measuring First Block Cache.

No pretrained DiT can be downloaded here, so this one is trained from scratch by
`python -m examples.digits.train` (about 10 minutes on one idle CPU thread) and its checkpoint,
digit_dit.pt, ships with the repository. Its blocks sit in `model.blocks` (an nn.ModuleList)
and every attention is one call to F.scaled_dot_product_attention, the shape para-fx looks for.

Conventions (rectified flow): x_t = (1 - t) * x0 + t * noise, so t = 1 is pure noise and t = 0
is data; the model predicts the velocity noise - x0. Images live in [-1, 1] inside the model;
`sample` returns them in [0, 1], the range `psnr` assumes.
"""

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IMAGE_SIZE

DEFAULT_CHECKPOINT = Path(__file__).with_name("digit_dit.pt")
DEFAULT_CONFIG = dict(image_size=IMAGE_SIZE, patch_size=2, dim=64, depth=8, heads=4, mlp_ratio=4, num_classes=10)

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 so that nearby steps differ), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample shift and scale [B, D] broadcast over the tokens of x [B, S, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Attention and MLP, each with adaLN-Zero: conditioning picks shift, scale and a gate that starts at 0."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada_ln[1].weight)
        nn.init.zeros_(self.ada_ln[1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(cond).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN then a zero-initialised projection to patch pixels, so an untrained model predicts 0."""

    def __init__(self, dim: int, patch_pixels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_pixels)
        for layer in (self.ada_ln[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DigitDiT(nn.Module):
    """DiT over 1-channel images: patchify, `depth` adaLN-Zero blocks in `blocks`, final layer, unpatchify."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: int, num_classes: int):
        super().__init__()
        if image_size % patch_size or dim % heads:
            raise ValueError("image_size must be a multiple of patch_size and dim a multiple of heads")
        self.config = dict(image_size=image_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes)
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.patchify = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(0.02 * torch.randn(1, self.grid * self.grid, dim))
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_embedding = nn.Embedding(num_classes, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(dim, patch_size * patch_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity for images x [B, 1, H, W] at times t [B] in [0, 1] with class labels [B] (long)."""
        batch = x.shape[0]
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.position
        cond = self.time_mlp(timestep_features(t, self.position.shape[-1])) + self.class_embedding(labels)
        for block in self.blocks:
            tokens = block(tokens, cond)
        patches = self.final(tokens, cond)  # [B, grid*grid, p*p]
        p, g = self.patch_size, self.grid
        return patches.view(batch, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(batch, 1, g * p, g * p)


def load(path: str | Path = DEFAULT_CHECKPOINT) -> DigitDiT:
    """The trained model from a checkpoint written by train.py, in eval mode and fp32."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitDiT(**checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.float().eval()


def flow_loss(model_fn: VelocityFn, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss: mean squared error of the predicted velocity, t drawn logit-normal(0, 1)."""
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    t = torch.sigmoid(torch.randn(images.shape[0], generator=generator)).to(images.device)
    x_t = (1 - t[:, None, None, None]) * images + t[:, None, None, None] * noise
    return F.mse_loss(model_fn(x_t, t, labels), noise - images)


def sample(model_fn: VelocityFn, labels: torch.Tensor, steps: int = 28, seed: int = 0, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images [B, 1, H, W] in [0, 1] by Euler steps from t = 1 to 0 on uniform times.

    model_fn(x, t, labels) -> velocity may be the model or a compiled one. The starting noise
    comes from a CPU torch.Generator seeded with `seed` (then moved to labels' device), so two
    calls with the same seed start from the same noise whatever the device.
    """
    noise = torch.randn((labels.shape[0], 1, image_size, image_size), generator=torch.Generator().manual_seed(seed))
    x = noise.to(labels.device)
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    with torch.no_grad():
        for t_now, t_next in zip(times[:-1], times[1:]):
            t = torch.full((labels.shape[0],), t_now, device=labels.device)
            x = x + (t_next - t_now) * model_fn(x, t, labels)
    return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (peak 1), over the whole batch; inf when equal."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
