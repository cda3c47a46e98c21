"""Wide rows quantised to fp8 by one kernel of para-fx's, with the gelu before them computed inside.

torchao's dynamic per-row fp8 quantises a linear layer's input on every call: each row's amax, a
scale, the row divided by it. Inductor reduces a row of more than a few thousand values in a loop
and reads it again to quantise it; on FLUX's widest inputs (a feed-forward's ``gelu(hidden)``,
12288 values, and a single block's ``cat(attention, gelu(mlp))``, 15360) its kernel takes 0.155
and 0.24 ms on an H200, where this one, a row per program held in registers and read once, takes
0.079 and 0.088 (``bench/row_quant_probe.py``).

``para_fx::quantize_rows(plain, gelu_input)`` returns the fp8 rows of ``cat(plain, gelu(gelu_input))``
(tanh gelu; ``plain`` may be None) and their float32 scales, bit for bit what torchao's code gives
in eager mode. It is a ``torch.library.triton_op``: Inductor sees the Triton kernel inside and
launches it from its own wrapper. Other devices (and CUDA without Triton: the CPU build's fake
CUDA graphs in the tests) run the same arithmetic as aten ops.
"""

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448: torchao's bound for e4m3
MAX_ROW = 16384  # values of a row that one program of the kernel holds in its registers
_TRITON = importlib.util.find_spec("triton") is not None


@torch.library.triton_op("para_fx::quantize_rows", mutates_args=())
def quantize_rows(plain: Optional[torch.Tensor], gelu_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 rows, float32 scales of shape [..., 1])`` of ``cat(plain, gelu(gelu_input), dim=-1)``."""
    if gelu_input.device.type == "cuda" and _TRITON:
        from .fp8_rows_kernel import launch  # Triton only where there is a GPU

        return launch(plain, gelu_input)
    return reference(plain, gelu_input)


def reference(plain: Optional[torch.Tensor], gelu_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's arithmetic (``_choose_scale_float8``, ``_quantize_affine_float8``) as aten ops:
    the amax and its division by 448 in the input's dtype, the quotient in float32."""
    rows = F.gelu(gelu_input, approximate="tanh")
    if plain is not None:
        rows = torch.cat([plain, rows], dim=-1)
    scale = (rows.abs().amax(dim=-1, keepdim=True) / FP8_MAX).to(torch.float32)
    return (rows.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
