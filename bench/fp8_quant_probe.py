"""One GPU: what torchao's dynamic row-wise fp8 costs around FLUX's two widest linear inputs, as
Inductor compiles it, next to the same code in bf16, under a few Inductor settings.

The fp8 FLUX step's GEMMs are twice as fast as bf16's, but quantising the activations adds Triton
kernels: a single block's ``proj_out(cat(attention, gelu(mlp)))`` and a double block's
``ff_out(gelu(hidden))`` read 12288-15360 columns per row, once for the row's amax and again to
quantise; a single block's modulated layer norm is a reduction over 3072 columns, and with fp8 the
row's amax joins it. This times those three patterns alone (kernel time under the profiler, per
call) so a setting can be judged in a minute instead of a two-minute FLUX compile.

    python bench/fp8_quant_probe.py --out results/fp8_quant_probe_<gpu>.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import compiled_kernels, measure_settings

from para_fx.core.inductor_choices import WideRowReductions

SETTINGS = {  # Inductor config patches tried
    "default": {},
    "wide_persistent_rows": {"inductor_choices_class": WideRowReductions},
    "no_split_wide_persistent_rows": {"split_reductions": False, "inductor_choices_class": WideRowReductions},
    "multi_kernel": {"triton.multi_kernel": 1},
    "no_split_reductions": {"split_reductions": False},
    "realize_opcount_1": {"realize_opcount_threshold": 1},
    "no_split_coordinate_descent": {"split_reductions": False, "coordinate_descent_tuning": True},
}


class SingleBlockOutput(nn.Module):
    """FLUX's single block after attention: the attention's heads and the MLP's gelu, concatenated."""

    def __init__(self):
        super().__init__()
        self.proj_out = nn.Linear(3072 + 12288, 3072)

    def forward(self, attention: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
        attention = attention.transpose(1, 2).reshape(1, -1, 3072)
        return self.proj_out(torch.cat([attention, F.gelu(mlp, approximate="tanh")], dim=2))


class FeedForwardOutput(nn.Module):
    """FLUX's double-block feed-forward after its first projection."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(12288, 3072)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(hidden, approximate="tanh"))


class NormedInput(nn.Module):
    """FLUX's single block before its MLP: the residual's layer norm, modulated, then projected."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(3072, elementwise_affine=False, eps=1e-6)
        self.proj_mlp = nn.Linear(3072, 12288)

    def forward(self, hidden: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.proj_mlp(self.norm(hidden) * (1 + scale[:, None]) + shift[:, None])


def cases() -> dict[str, tuple[type, tuple[torch.Tensor, ...]]]:
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    return {
        "single": (SingleBlockOutput, (torch.randn(1, 24, 4608, 128, **bf16), torch.randn(1, 4608, 12288, **bf16))),
        "double": (FeedForwardOutput, (torch.randn(1, 4096, 12288, **bf16),)),
        "norm": (NormedInput, (torch.randn(1, 4608, 3072, **bf16), torch.randn(1, 3072, **bf16), torch.randn(1, 3072, **bf16))),
    }


def measure(cls: type, args: tuple, fp8: bool, setting: dict, calls: int = 10) -> dict:
    """Kernel milliseconds per call of the compiled module, by kernel, and its error against eager."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    torch._dynamo.reset()
    module = cls().to("cuda", torch.bfloat16).eval()
    if fp8:
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    kernels, error = compiled_kernels(module, args, {}, setting, calls, width=90)
    gemm = sum(ms for name, ms in kernels.items() if any(s in name for s in ("nvjet", "gemm", "cutlass")))
    return {"total_ms": round(sum(kernels.values()), 4), "gemm_ms": round(gemm, 4), "rel_err_vs_eager": error,
            "kernels": {name: round(ms, 4) for name, ms in kernels.items()}}


def measure_cases(setting: dict) -> dict:
    """Every pattern of :func:`cases`, in bf16 and in fp8, under one setting."""
    return {f"{name}_{'fp8' if fp8 else 'bf16'}": measure(cls, inputs, fp8, setting)
            for name, (cls, inputs) in cases().items() for fp8 in (False, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="fp8_quant_probe.json")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = measure_settings(SETTINGS, args.settings, measure_cases,
                               lambda result: {k: (v["total_ms"], v["gemm_ms"]) for k, v in result.items()})
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
