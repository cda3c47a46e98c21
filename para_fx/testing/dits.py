"""Two small diffusion transformers in plain PyTorch, for tests.

They are written to be read top to bottom: no diffusers, no attention
processors, every attention a single call to
F.scaled_dot_product_attention. They cover the two shapes of DiT that
para-fx has to shard:

* PatchDiT: the original DiT (Peebles & Xie). One image stream, adaLN-Zero
  conditioning from a timestep and a pooled vector, a learned position
  embedding with one row per patch.
* JointDiT: an MMDiT / FLUX double-stream model. Text and image tokens keep
  separate weights but attend jointly over cat([txt, img]), with RMSNorm on
  q/k and rotary embeddings built inside forward.

Default sizes give odd token counts (35 image tokens, 7 text tokens), so
sharding code has to deal with uneven splits. Each factory returns
(model, kwargs) for model(**kwargs); the same seed gives the same model
and inputs.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------


def first_tensor(out):
    """The output tensor of a model call (diffusers models return a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features followed by an MLP, so the model can learn its own time code."""

    def __init__(self, dim: int, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample shift/scale [B, D] broadcast over the sequence of x [B, S, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; used on q and k so attention logits stay bounded."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


# --------------------------------------------------------------------------
# PatchDiT: the original DiT
# --------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        # [B, S, 3*D] -> 3 x [B, H, S, Dh]
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class DiTBlock(nn.Module):
    """Attention + MLP, each wrapped in adaLN-Zero (shift, scale, and a residual gate from cond)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift/scale only) then a linear map from hidden size to patch pixels."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PatchDiT(nn.Module):
    """DiT on image latents [B, C, H, W] -> [B, C, H, W].

    The input size is fixed at construction because the learned position
    embedding has one row per patch ([1, num_patches, dim]), which makes it a
    parameter laid out along the sequence.
    """

    def __init__(
        self,
        input_size: tuple[int, int] = (14, 10),
        in_channels: int = 4,
        patch_size: int = 2,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        cond_dim: int = 32,
        zero_init: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.grid = (input_size[0] // patch_size, input_size[1] // patch_size)
        num_patches = self.grid[0] * self.grid[1]

        self.x_embedder = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Linear(cond_dim, dim)  # pooled conditioning (e.g. a pooled text embedding)
        self.blocks = nn.ModuleList([DiTBlock(dim, num_heads) for _ in range(depth)])
        self.final_layer = FinalLayer(dim, patch_size * patch_size * in_channels)

        if zero_init:
            # adaLN-Zero: every block starts as the identity and the output as zero.
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
        B = x.shape[0]
        h, w = self.grid
        p, C = self.patch_size, self.in_channels
        x = x.reshape(B, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # B, C, h, p, w, p
        return x.reshape(B, C, h * p, w * p)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(timestep) + self.y_embedder(pooled)  # [B, D]
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)


def patch_dit(seed: int = 0, batch: int = 2, height: int = 14, width: int = 10, patch_size: int = 2, **config):
    """PatchDiT on a 7x5 patch grid (35 tokens) by default.

    zero_init=False: with adaLN-Zero init every block is the identity and the
    output is zero, which would hide almost any bug in a test. A trained model
    has non-zero gates, so the factory keeps the random init.
    """
    torch.manual_seed(seed)
    cfg = dict(input_size=(height, width), patch_size=patch_size, zero_init=False)
    cfg.update(config)
    model = PatchDiT(**cfg).eval()

    g = torch.Generator().manual_seed(seed)
    kwargs = dict(
        x=torch.randn(batch, model.in_channels, height, width, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        pooled=torch.randn(batch, model.y_embedder.in_features, generator=g),
    )
    return model, kwargs


# --------------------------------------------------------------------------
# JointDiT: MMDiT / FLUX double-stream
# --------------------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos/sin tables [S, head_dim // 2] for 1D rotary embeddings at integer positions [S]."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * inv_freq[None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = halves of the head dim; x is [B, H, S, Dh], cos/sin [S, Dh/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class StreamProjections(nn.Module):
    """The per-stream weights of a joint block: modulation, qkv, q/k norms, out proj, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        head_dim = dim // num_heads
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))


class JointBlock(nn.Module):
    """Two streams with their own weights and one attention over cat([txt, img])."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.txt = StreamProjections(dim, num_heads)
        self.img = StreamProjections(dim, num_heads)

    def qkv(self, s: StreamProjections, x: torch.Tensor, shift, scale):
        B, S, _ = x.shape
        qkv = s.qkv(modulate(s.norm1(x), shift, scale))
        q, k, v = qkv.view(B, S, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, S, H, Dh]
        return s.q_norm(q), s.k_norm(k), v

    def forward(self, img, txt, c, cos, sin):
        B, T, D = txt.shape
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img.mod(c).chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt.mod(c).chunk(6, dim=-1)

        tq, tk, tv = self.qkv(self.txt, txt, t_shift1, t_scale1)
        iq, ik, iv = self.qkv(self.img, img, i_shift1, i_scale1)

        # Joint sequence, text first; [B, S, H, Dh] -> [B, H, S, Dh].
        q = torch.cat([tq, iq], dim=1).transpose(1, 2)
        k = torch.cat([tk, ik], dim=1).transpose(1, 2)
        v = torch.cat([tv, iv], dim=1).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, -1, D)
        txt_attn, img_attn = out.split([T, out.shape[1] - T], dim=1)

        img = img + i_gate1[:, None] * self.img.proj(img_attn)
        img = img + i_gate2[:, None] * self.img.mlp(modulate(self.img.norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate1[:, None] * self.txt.proj(txt_attn)
        txt = txt + t_gate2[:, None] * self.txt.mlp(modulate(self.txt.norm2(txt), t_shift2, t_scale2))
        return img, txt


class JointDiT(nn.Module):
    """MMDiT-style model: image latents [B, C, H, W] plus text tokens [B, T, txt_dim] -> [B, C, H, W].

    Patchify is a reshape plus a Linear (FLUX-style packing). Positions are
    0..T-1 for text then T..T+N-1 for image; the RoPE tables are built in
    forward from an arange, so nothing in the model depends on the sequence
    length.
    """

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        dim: int = 64,
        depth: int = 3,
        num_heads: int = 4,
        txt_dim: int = 32,
        cond_dim: int = 32,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rope_theta = rope_theta

        self.img_in = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.txt_in = nn.Linear(txt_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Linear(cond_dim, dim)
        self.blocks = nn.ModuleList([JointBlock(dim, num_heads) for _ in range(depth)])
        self.final_layer = FinalLayer(dim, patch_size * patch_size * in_channels)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p]."""
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """[B, (H/p)*(W/p), p*p*C] -> [B, C, H, W]."""
        B = x.shape[0]
        p, C = self.patch_size, self.in_channels
        x = x.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, H, W)

    def forward(self, x, encoder_hidden_states, timestep, pooled):
        H, W = x.shape[-2:]
        img = self.img_in(self.patchify(x))
        txt = self.txt_in(encoder_hidden_states)
        c = self.t_embedder(timestep) + self.y_embedder(pooled)

        positions = torch.arange(txt.shape[1] + img.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)

        for block in self.blocks:
            img, txt = block(img, txt, c, cos, sin)
        return self.unpatchify(self.final_layer(img, c), H, W)


def joint_dit(seed: int = 0, batch: int = 1, height: int = 14, width: int = 10, text_len: int = 7, **config):
    """JointDiT with 7 text tokens and a 7x5 patch grid (35 image tokens) by default."""
    torch.manual_seed(seed)
    model = JointDiT(**config).eval()

    g = torch.Generator().manual_seed(seed)
    kwargs = dict(
        x=torch.randn(batch, model.in_channels, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, model.txt_in.in_features, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        pooled=torch.randn(batch, model.y_embedder.in_features, generator=g),
    )
    return model, kwargs


# --------------------------------------------------------------------------
# RowDiT: projections on flattened [B*S, D] rows, optional complex RoPE
# --------------------------------------------------------------------------


def complex_rope(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotations e^(i * position * freq) as complex numbers [S, head_dim // 2]."""
    cos, sin = rope_cos_sin(positions, head_dim, theta)
    return torch.complex(cos, sin)


def apply_complex_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the head dim as complex numbers; x is [B, S, H, Dh], rotations [S, Dh/2]."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations[None, :, None]).flatten(3).type_as(x)


class RowAttention(nn.Module):
    """Self-attention whose projections see [B*S, D] rows, as many DiTs write it: the batch and
    the sequence share one dim around every linear."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, rows: torch.Tensor, batch: int, rotations: torch.Tensor | None) -> torch.Tensor:
        heads = lambda t: t.view(batch, -1, self.num_heads, self.head_dim)  # [B*S, D] -> [B, S, H, Dh]
        q, k, v = heads(self.to_q(rows)), heads(self.to_k(rows)), heads(self.to_v(rows))
        if rotations is not None:
            q, k = apply_complex_rope(q, rotations), apply_complex_rope(k, rotations)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out(out.transpose(1, 2).reshape(rows.shape))


class RowBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RowAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, rows, batch, rotations):
        rows = rows + self.attn(self.norm1(rows), batch, rotations)
        return rows + self.mlp(self.norm2(rows))


class RowDiT(nn.Module):
    """Tokens [B, S, in_dim] -> [B, S, in_dim], every block on [B*S, D] rows (the flattened
    (batch, sequence) of diffusers' DiT, PixArt or CogVideoX attention). With ``complex_rope``,
    q and k are rotated as complex numbers (view_as_complex, a complex multiply, view_as_real), as
    QwenImage and Lumina do."""

    def __init__(self, in_dim: int = 16, dim: int = 64, depth: int = 2, num_heads: int = 4, complex_rope: bool = False):
        super().__init__()
        self.head_dim = dim // num_heads
        self.complex_rope = complex_rope
        self.proj_in = nn.Linear(in_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList([RowBlock(dim, num_heads) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, in_dim)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        h = self.proj_in(x) + self.t_embedder(timestep)[:, None]
        rotations = complex_rope(torch.arange(S, device=x.device), self.head_dim) if self.complex_rope else None
        rows = h.reshape(B * S, -1)
        for block in self.blocks:
            rows = block(rows, B, rotations)
        return self.proj_out(rows).view(B, S, -1)


def row_dit(seed: int = 0, batch: int = 2, tokens: int = 35, **config):
    """RowDiT at batch 2 (the CFG batch) on 35 tokens."""
    torch.manual_seed(seed)
    model = RowDiT(**config).eval()
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(
        x=torch.randn(batch, tokens, model.proj_in.in_features, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )
    return model, kwargs


def complex_rope_dit(seed: int = 0, **kwargs):
    """RowDiT with complex rotary embeddings."""
    return row_dit(seed, complex_rope=True, **kwargs)


# --------------------------------------------------------------------------
# fp8 linears, as torchao's dynamic fp8 quantization lowers them
# --------------------------------------------------------------------------


class Fp8Linear(nn.Module):
    """y = x W^T + b through ``torch._scaled_mm``: per-row activation scales computed on the fly,
    a per-row (per output channel) weight scale, like torchao's dynamic fp8 with PerRow().
    ``scale_column``: the weight scale kept as torchao keeps it, ``[out, 1]``, and transposed at
    each call; else kept as ``[1, out]``."""

    def __init__(self, linear: nn.Linear, scale_column: bool = False):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
        self.scale_column = scale_column
        self.register_buffer("weight", (weight / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale if scale_column else scale.t().contiguous())
        self.register_buffer("bias", linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
        quantized = (rows / scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale.t() if self.scale_column else self.weight_scale,
            bias=self.bias, out_dtype=torch.float32,
        )
        return out.reshape(*x.shape[:-1], -1)


def fp8_patch_dit(seed: int = 0, **kwargs):
    """PatchDiT whose MLPs run in fp8."""
    model, inputs = patch_dit(seed, **kwargs)
    for block in model.blocks:
        block.mlp.fc1, block.mlp.fc2 = Fp8Linear(block.mlp.fc1), Fp8Linear(block.mlp.fc2)
    return model, inputs


class LinearAttention(nn.Module):
    """ReLU linear attention, as Sana writes it: relu(q) (relu(k)^T v) / (relu(q) relu(k)^T 1), linear
    in the tokens. v gains a column of ones, so one matmul sums both the values and the keys over
    every token (numerator and normaliser); split over the tokens, that sum is the one exchange."""

    def __init__(self, attention: SelfAttention, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim, self.eps = attention.num_heads, attention.head_dim, eps
        self.qkv, self.proj = attention.qkv, attention.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 1), value=1.0)  # [B, H, S, Dh + 1]
        kv = k.transpose(-1, -2) @ v  # [B, H, Dh, Dh + 1]: a sum over the tokens
        out = q @ kv
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


def linear_attention_dit(seed: int = 0, **kwargs):
    """PatchDiT whose attention is linear (:class:`LinearAttention`) after the first block. The
    first keeps softmax attention: an attention call is what asks for the tokens to be split (as
    Sana's cross-attention to the text does), and the linear blocks then run on the split tokens."""
    model, inputs = patch_dit(seed, **kwargs)
    for block in model.blocks[1:]:
        block.attn = LinearAttention(block.attn)
    return model, inputs


class MatmulAttention(nn.Module):
    """Softmax attention written out, as reference DiTs often do: ``q @ k^T``, scaled after the
    matmul, a learned per-head bias over (query, key) positions, softmax in fp32, ``@ v``."""

    def __init__(self, attention: SelfAttention, tokens: int):
        super().__init__()
        self.num_heads, self.head_dim = attention.num_heads, attention.head_dim
        self.qkv, self.proj = attention.qkv, attention.proj
        self.position_bias = nn.Parameter(torch.randn(self.num_heads, tokens, tokens) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5 + self.position_bias
        probabilities = scores.float().softmax(dim=-1).to(q.dtype)
        out = probabilities @ v
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


def matmul_attention_dit(seed: int = 0, **kwargs):
    """PatchDiT whose attention is written as matmuls and a softmax (:class:`MatmulAttention`)."""
    model, inputs = patch_dit(seed, **kwargs)
    torch.manual_seed(seed + 1)
    for block in model.blocks:
        block.attn = MatmulAttention(block.attn, model.grid[0] * model.grid[1])
    return model, inputs


class TorchMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` called as most code calls it, weights asked for (its default): it
    then computes the attention as matmuls and a softmax over ``[B*H, L, D]``; with
    ``padded_keys``, the last tokens hidden by a key padding mask (a ``baddbmm`` then)."""

    def __init__(self, attention: SelfAttention, padded_keys: int = 0):
        super().__init__()
        dim = attention.num_heads * attention.head_dim
        self.attention = nn.MultiheadAttention(dim, attention.num_heads, batch_first=True)
        self.padded_keys = padded_keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = None
        if self.padded_keys:
            positions = torch.arange(x.shape[1], device=x.device)
            padding = (positions >= x.shape[1] - self.padded_keys).expand(x.shape[0], -1)
        return self.attention(x, x, x, key_padding_mask=padding)[0]


def mha_dit(seed: int = 0, padded_keys: int = 0, **kwargs):
    """PatchDiT whose attention is ``nn.MultiheadAttention`` (:class:`TorchMultiheadAttention`)."""
    model, inputs = patch_dit(seed, **kwargs)
    torch.manual_seed(seed + 1)
    for block in model.blocks:
        block.attn = TorchMultiheadAttention(block.attn, padded_keys)
    return model, inputs


FACTORIES = {
    "patch_dit": patch_dit,
    "linear_attention_dit": linear_attention_dit,
    "matmul_attention_dit": matmul_attention_dit,
    "mha_dit": mha_dit,
    "joint_dit": joint_dit,
    "fp8_patch_dit": fp8_patch_dit,
    "row_dit": row_dit,
    "complex_rope_dit": complex_rope_dit,
}
