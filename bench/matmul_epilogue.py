"""One GPU: FLUX's feed-forward matmuls with the gelu in cuBLASLt's epilogue, and a single block's
``proj_out(cat(attention, mlp))`` as two matmuls over the halves of its inner dim, against the
code Inductor compiles from the model.

In bf16 Inductor runs each projection on cuBLAS (its bias already in the epilogue) and the gelu
after it as a Triton kernel that reads and writes the 12288-wide hidden state again; in a single
block that kernel also copies the attention into the concatenation that ``proj_out`` reads.
``aten._addmm_activation(bias, x, w, use_gelu=True)`` is cuBLASLt's GELU_BIAS epilogue (the tanh
approximation), and ``cat([a, b]) @ w == a @ w[:ka] + b @ w[ka:]`` needs no concatenation. This
times each variant alone (CUDA events, median) so the rewrite's worth is known before FLUX's
two-minute compile, and writes the kernels each ran.

    python bench/matmul_epilogue.py --out results/matmul_epilogue_<gpu>.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from harness import cuda_median_ms, environment, kernel_ms_by_name

aten = torch.ops.aten
DIM, HIDDEN = 3072, 12288


def single_block(x, attention, w_mlp, b_mlp, w_out, b_out):
    """FLUX's single block after attention, as the model writes it."""
    mlp = F.gelu(F.linear(x, w_mlp, b_mlp), approximate="tanh")
    return F.linear(torch.cat([attention, mlp], dim=-1), w_out, b_out)


def single_block_epilogue(x, attention, w_mlp, b_mlp, w_out, b_out):
    mlp = aten._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True)
    return F.linear(torch.cat([attention, mlp], dim=-1), w_out, b_out)


def single_block_split(x, attention, w_mlp, b_mlp, w_out, b_out):
    mlp = F.gelu(F.linear(x, w_mlp, b_mlp), approximate="tanh")
    return torch.addmm(torch.addmm(b_out, attention, w_out[:, :DIM].t()), mlp, w_out[:, DIM:].t())


def single_block_epilogue_split(x, attention, w_mlp, b_mlp, w_out, b_out):
    mlp = aten._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True)
    return torch.addmm(torch.addmm(b_out, attention, w_out[:, :DIM].t()), mlp, w_out[:, DIM:].t())


def feed_forward(x, w_in, b_in, w_out, b_out):
    return F.linear(F.gelu(F.linear(x, w_in, b_in), approximate="tanh"), w_out, b_out)


def feed_forward_epilogue(x, w_in, b_in, w_out, b_out):
    return F.linear(aten._addmm_activation(b_in, x, w_in.t(), use_gelu=True), w_out, b_out)


def measure(variants: dict, args: tuple) -> dict:
    reference = variants[next(iter(variants))](*(a.double() for a in args)).float()
    results = {}
    for name, fn in variants.items():
        compiled = torch.compile(fn)
        run = lambda: compiled(*args)  # noqa: E731
        out = run().float()
        results[name] = {
            "ms": round(cuda_median_ms(run, repeat=50, warmup=5), 4),
            "rel_err_vs_fp64": float((out - reference).norm() / reference.norm()),
            "kernels": {name: round(ms, 4) for name, ms in kernel_ms_by_name(run, calls=5).items()},
        }
        torch._dynamo.reset()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen) * std

    result = {"environment": environment(device), "shapes": {}}
    for rows in (4608, 4096, 512):
        ff = (randn(rows, DIM), randn(HIDDEN, DIM, std=0.02), randn(HIDDEN, std=0.02),
              randn(DIM, HIDDEN, std=0.02), randn(DIM, std=0.02))
        result["shapes"][f"feed_forward_{rows}"] = measure(
            {"inductor": feed_forward, "epilogue": feed_forward_epilogue}, ff)
    single = (randn(4608, DIM), randn(4608, DIM), randn(HIDDEN, DIM, std=0.02), randn(HIDDEN, std=0.02),
              randn(DIM, DIM + HIDDEN, std=0.02), randn(DIM, std=0.02))
    result["shapes"]["single_block_4608"] = measure(
        {"inductor": single_block, "epilogue": single_block_epilogue, "split": single_block_split,
         "epilogue_split": single_block_epilogue_split}, single)
    for shape, rows in result["shapes"].items():
        print(shape, {name: row["ms"] for name, row in rows.items()},
              {name: f"{row['rel_err_vs_fp64']:.2e}" for name, row in rows.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
