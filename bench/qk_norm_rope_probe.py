"""One GPU: FLUX's attention before the attention kernel (q/k/v projections, the q/k RMSNorm and
the rotary embedding), as Inductor compiles diffusers' own ``FluxAttention``, under a few Inductor
settings.

The bf16 FLUX step's profile (one H200) has one Triton kernel per single block that normalises
and rotates q and k for cuDNN's attention, 0.096 ms for 2 x 4608 x 3072 bf16 values read and
written (113 MB, about 0.03 ms at the memory's speed), 3.6 ms a step, 4.3 ms with fp8. This times
the module alone (kernel time under the profiler, per call, by kernel) so a setting or a rewrite
can be judged in a minute instead of a two-minute FLUX compile.

    python bench/qk_norm_rope_probe.py --out results/qk_norm_rope_probe_<gpu>.json
"""

from __future__ import annotations

import argparse
import json

import torch

from harness import compiled_kernels, measure_settings

from para_fx.core.inductor_choices import WideRowReductions

DECISIONS: list[dict] = []  # what the recording choices below saw: each reduction's hint, width, verdict


class RecordingRows(WideRowReductions):
    """para's choices, recording each reduction's hint and width and whether it is kept persistent."""

    any_hint = False

    def uuid(self) -> str:
        return f"qk_norm_rope_probe.{type(self).__name__}"

    @classmethod
    def should_use_persistent_reduction(cls, features, cooperative_reduction: bool) -> bool:
        from torch._inductor.virtualized import V

        small = V.graph.sizevars.statically_known_leq(features.reduction_numel, 1024)
        persistent = (cls.any_hint and small and not cooperative_reduction) or \
            WideRowReductions.should_use_persistent_reduction(features, cooperative_reduction)
        DECISIONS.append({"choices": cls.__name__, "hint": str(features.get_reduction_hint()),
                          "width": str(features.reduction_numel), "persistent": persistent})
        return persistent


class AnyHintRows(RecordingRows):
    """Also rows of up to 1024 values persistent whatever Inductor's hint for them."""

    any_hint = True


SETTINGS = {  # Inductor config patches tried
    "default": {},
    "para_rows": {"inductor_choices_class": RecordingRows},
    "any_hint_rows": {"inductor_choices_class": AnyHintRows},
    "no_split_reductions": {"split_reductions": False},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "multi_kernel": {"triton.multi_kernel": 1},
    "realize_opcount_1": {"realize_opcount_threshold": 1},
}


def flux_single_attention(tokens: int = 4608, text: int = 512, device: str = "cuda"):
    """A FLUX.1-dev single block's attention (24 heads x 128, q/k RMSNorm) in bf16 and the rotary
    embedding of a 1024 px image's positions with 512 text tokens."""
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed

    attention = FluxAttention(query_dim=3072, heads=24, dim_head=128, bias=True, eps=1e-6, pre_only=True)
    attention = attention.to(device, torch.bfloat16).eval()
    side = int((tokens - text) ** 0.5)
    ids = torch.zeros(tokens, 3, device=device)
    ids[text:, 1] = torch.arange(side, device=device).repeat_interleave(side).float()
    ids[text:, 2] = torch.arange(side, device=device).repeat(side).float()
    rotary = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    hidden = torch.randn(1, tokens, 3072, device=device, dtype=torch.bfloat16)
    return attention, (hidden,), {"image_rotary_emb": rotary}


def measure(setting: dict, calls: int = 10) -> dict:
    """Kernel milliseconds per call of the compiled module, by kernel, and its error against eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module, args, kwargs = flux_single_attention()
    kernels, error = compiled_kernels(module, args, kwargs, setting, calls, width=110)
    triton = sum(ms for name, ms in kernels.items() if name.startswith("triton_"))
    return {"total_ms": round(sum(kernels.values()), 4), "triton_ms": round(triton, 4), "rel_err_vs_eager": error,
            "kernels": {name: round(ms, 4) for name, ms in kernels.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="qk_norm_rope_probe.json")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    args = parser.parse_args()
    results = measure_settings(SETTINGS, args.settings, measure,
                               lambda result: {k: result[k] for k in ("total_ms", "triton_ms")})
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": results,
                   "decisions": DECISIONS}, f, indent=1)


if __name__ == "__main__":
    main()
