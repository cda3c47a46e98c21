"""One GPU: how fast can a wide row be quantised to fp8 (torchao's dynamic per-row scaling, with
the tanh gelu before it), against what Inductor generates for the same code?

FLUX's fp8 step spends about 11 ms in two such kernels (a single block's ``cat(attention,
gelu(mlp))``, 15360 wide, and a feed-forward's ``gelu(hidden)``, 12288 wide) where reading each
value once at the memory's speed takes about 0.03 ms a call. This times Triton kernels for the
pattern (the row read in a loop twice, or once into registers as para-fx's ``quantize_rows`` does;
several block sizes and warp counts) next to Inductor's kernel for torchao's own code, under a few
Inductor settings, and checks each kernel's fp8 bytes and scales against eager.

    python bench/row_quant_probe.py --out results/row_quant_probe_<gpu>.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from harness import kernel_ms_by_name

from para_fx.runtime.fp8_rows import FP8_MAX
from para_fx.runtime.fp8_rows import reference as eager  # torchao's arithmetic
from para_fx.runtime.fp8_rows_kernel import quantize_rows_kernel, row_scale, row_values, to_fp8


@triton.jit
def looped_kernel(plain_ptr, gelu_ptr, out_ptr, scale_ptr, n_plain, n_gelu, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program, read twice in blocks: once for the amax, once to quantise."""
    row = tl.program_id(0).to(tl.int64)
    n = n_plain + n_gelu
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(row_values(plain_ptr, gelu_ptr, row, cols, n_plain, n_gelu)))
    scale = row_scale(tl.max(amax, 0), FP8_MAX)
    tl.store(scale_ptr + row, scale)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        values = row_values(plain_ptr, gelu_ptr, row, cols, n_plain, n_gelu)
        tl.store(out_ptr + row * n + cols, to_fp8(values, scale, FP8_MAX), mask=cols < n)


@triton.jit
def row_loop_kernel(plain_ptr, gelu_ptr, out_ptr, scale_ptr, rows, n_plain, n_gelu, FP8_MAX: tl.constexpr,
                    BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """A fixed grid whose programs take rows in turn, each read once into registers: the next row's
    loads can be issued (``STAGES`` deep) while this one is reduced and stored."""
    n = n_plain + n_gelu
    cols = tl.arange(0, BLOCK)
    for row in tl.range(tl.program_id(0).to(tl.int64), rows, tl.num_programs(0), num_stages=STAGES):
        values = row_values(plain_ptr, gelu_ptr, row, cols, n_plain, n_gelu)
        scale = row_scale(tl.max(tl.abs(values), 0), FP8_MAX)
        tl.store(scale_ptr + row, scale)
        tl.store(out_ptr + row * n + cols, to_fp8(values, scale, FP8_MAX), mask=cols < n)


def hand_written(kernel, plain, hidden, block: int, num_warps: int, programs: int = 0, stages: int = 1):
    rows, n_gelu = hidden.shape
    n_plain = 0 if plain is None else plain.shape[1]
    out = torch.empty(rows, n_plain + n_gelu, device=hidden.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device=hidden.device, dtype=torch.float32)
    first = hidden if plain is None else plain
    if programs:
        kernel[(programs,)](first, hidden, out, scale, rows, n_plain, n_gelu, FP8_MAX=FP8_MAX, BLOCK=block, STAGES=stages,
                            num_warps=num_warps)
    else:
        kernel[(rows,)](first, hidden, out, scale, n_plain, n_gelu, FP8_MAX=FP8_MAX, BLOCK=block, num_warps=num_warps)
    return out, scale


def compare(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The share of fp8 values that differ from eager's, and the largest relative scale error."""
    q, s = got
    eq, es = expected
    return {"fp8_mismatch": round((q.view(torch.uint8) != eq.view(torch.uint8)).float().mean().item(), 6),
            "scale_rel_err": ((s - es).abs() / es.abs().clamp_min(1e-30)).max().item()}


INDUCTOR_SETTINGS = {
    "default": {},
    "no_split": {"split_reductions": False},
    "max_autotune_pointwise": {"max_autotune_pointwise": True},
    "coordinate_descent": {"split_reductions": False, "coordinate_descent_tuning": True},
}


def kernel_ms(fn) -> float:
    """Device milliseconds of ``fn()``'s kernels per call, under the profiler: the launch's host
    time (Python for the hand-written kernels, Dynamo's guards for Inductor's) left out."""
    fn()
    return round(sum(kernel_ms_by_name(fn, calls=20).values()), 4)


def measure(plain: torch.Tensor | None, hidden: torch.Tensor) -> dict:
    expected = eager(plain, hidden)
    width = hidden.shape[1] + (0 if plain is None else plain.shape[1])
    results = {}
    for label, setting in INDUCTOR_SETTINGS.items():
        torch._dynamo.reset()
        with torch._inductor.config.patch(setting):
            compiled = torch.compile(eager)
            got = compiled(plain, hidden)
            results[f"inductor_{label}"] = {"ms": kernel_ms(lambda: compiled(plain, hidden)), **compare(got, expected)}
    for block in (1024, 2048, 4096):
        for num_warps in (2, 4, 8, 16):
            run = lambda: hand_written(looped_kernel, plain, hidden, block, num_warps)  # noqa: E731
            results[f"looped_{block}_{num_warps}w"] = {"ms": kernel_ms(run), **compare(run(), expected)}
    block = triton.next_power_of_2(width)
    for num_warps in (4, 8, 16, 32):
        run = lambda: hand_written(quantize_rows_kernel.fn, plain, hidden, block, num_warps)  # noqa: E731
        results[f"persistent_{num_warps}w"] = {"ms": kernel_ms(run), **compare(run(), expected)}
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
    for per_sm in (1, 2, 4):
        for num_warps in (8, 16):
            for stages in (1, 2):
                run = lambda: hand_written(row_loop_kernel, plain, hidden, block, num_warps, sms * per_sm, stages)  # noqa: E731
                results[f"row_loop_{per_sm}persm_{num_warps}w_{stages}st"] = {"ms": kernel_ms(run), **compare(run(), expected)}
    run = lambda: torch.ops.para_fx.quantize_rows(plain, hidden)  # noqa: E731
    results["para_fx_quantize_rows"] = {"ms": kernel_ms(run), **compare(run(), expected)}
    bytes_moved = hidden.numel() * 2 + (0 if plain is None else plain.numel() * 2) + hidden.shape[0] * width
    results["memory_bound_ms"] = round(bytes_moved / 4.8e12 * 1e3, 4)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="row_quant_probe.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    cases = {
        "feed_forward_4096x12288": (None, torch.randn(4096, 12288, **bf16)),
        "single_block_4608x(3072+12288)": (torch.randn(4608, 3072, **bf16), torch.randn(4608, 12288, **bf16)),
    }
    results = {}
    for name, (plain, hidden) in cases.items():
        results[name] = measure(plain, hidden)
        best = min((v["ms"], k) for k, v in results[name].items() if isinstance(v, dict))
        print(name, json.dumps(results[name], indent=None), "best:", best, flush=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
