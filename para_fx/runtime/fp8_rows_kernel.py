"""The Triton kernel of ``para_fx::quantize_rows`` (:mod:`para_fx.runtime.fp8_rows`): one program per
row, the row read once into registers (up to ``MAX_ROW`` values), its amax reduced there, the
quantised row and its scale written. Imported only on a GPU: the CPU build of torch has no Triton."""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .fp8_rows import FP8_MAX, MAX_ROW


@triton.jit
def _gelu_tanh(x):
    """gelu's tanh form, tanh(z) as 1 - 2 / (exp(2z) + 1): gelu adds it to 1, so only its absolute
    error counts, and that is float32's (one exp and one division, no polynomial)."""
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(1.5957691216057308 * (x + 0.044715 * x * x * x)) + 1.0))


@triton.jit
def row_values(plain_ptr, gelu_ptr, row, cols, n_plain, n_gelu):
    """Columns ``cols`` of row ``row`` of ``cat(plain, gelu(gelu_input))`` in float32, the gelu
    rounded to bf16 as eager mode stores it."""
    is_plain = cols < n_plain
    plain = tl.load(plain_ptr + row * n_plain + cols, mask=is_plain, other=0.0).to(tl.float32)
    in_gelu = (cols >= n_plain) & (cols < n_plain + n_gelu)
    hidden = tl.load(gelu_ptr + row * n_gelu + (cols - n_plain), mask=in_gelu, other=0.0).to(tl.float32)
    return tl.where(is_plain, plain, _gelu_tanh(hidden).to(tl.bfloat16).to(tl.float32))


@triton.jit
def row_scale(amax, FP8_MAX: tl.constexpr):
    """A row's scale from its amax: divided in bf16 as torchao divides, then float32."""
    return (amax / FP8_MAX).to(tl.bfloat16).to(tl.float32)


@triton.jit
def to_fp8(values, scale, FP8_MAX: tl.constexpr):
    return tl.clamp(values / scale, -FP8_MAX, FP8_MAX).to(tl.float8e4nv)


NUM_WARPS = 16  # of 4, 8, 16 and 32 on an H200, the fastest for rows of 12288 and 15360 (bench/row_quant_probe.py)


@triton.autotune(configs=[triton.Config({}, num_warps=NUM_WARPS)], key=[])  # one config: how Inductor takes warps
@triton.jit
def quantize_rows_kernel(plain_ptr, gelu_ptr, out_ptr, scale_ptr, n_plain, n_gelu, FP8_MAX: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = n_plain + n_gelu
    cols = tl.arange(0, BLOCK)
    values = row_values(plain_ptr, gelu_ptr, row, cols, n_plain, n_gelu)
    scale = row_scale(tl.max(tl.abs(values), 0), FP8_MAX)
    tl.store(scale_ptr + row, scale)
    tl.store(out_ptr + row * n + cols, to_fp8(values, scale, FP8_MAX), mask=cols < n)


def launch(plain: torch.Tensor | None, gelu_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_gelu = gelu_input.shape[-1]
    n_plain = 0 if plain is None else plain.shape[-1]
    if n_plain + n_gelu > MAX_ROW:
        raise ValueError(f"para_fx::quantize_rows: rows of at most {MAX_ROW} values, got {n_plain + n_gelu}")
    gelu_input = gelu_input.contiguous()
    plain = gelu_input if plain is None else plain.contiguous()
    leading = gelu_input.shape[:-1]
    out = gelu_input.new_empty((*leading, n_plain + n_gelu), dtype=torch.float8_e4m3fn)
    scale = gelu_input.new_empty((*leading, 1), dtype=torch.float32)
    wrap_triton(quantize_rows_kernel)[(gelu_input.numel() // n_gelu,)](
        plain, gelu_input, out, scale, n_plain, n_gelu, FP8_MAX=FP8_MAX,
        BLOCK=triton.next_power_of_2(n_plain + n_gelu),
    )
    return out, scale
