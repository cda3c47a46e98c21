"""FLUX's projections at the rows one GPU holds at world 1 and at world 2 (half the tokens):
TFLOP/s of the default kernel (cuBLAS through ``F.linear``) and, for the rows given, of Inductor's
max-autotune choice. Written to tell whether the half-height matmuls of a context-parallel step
are slower per FLOP than the full ones, and whether autotuning wins that back.

    python bench/matmul_rows.py OUT.json [--autotune-rows 2304,2048]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (in features, out features) of FLUX.1-dev's projections; rows: image+text (single blocks),
# image, text tokens at 1024 px, and their halves
PROJECTIONS = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)]
ROWS = [4608, 4096, 512, 2304, 2048, 256]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--autotune-rows", default="", help="comma-separated rows to autotune (slow: tens of seconds each)")
    args = parser.parse_args()
    autotune_rows = {int(r) for r in args.autotune_rows.split(",") if r}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    for rows in ROWS:
        for k, n in PROJECTIONS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            flop = 2 * rows * k * n
            entry = {"cublas_ms": harness.cuda_median_ms(lambda: F.linear(x, w, bias))}
            entry["cublas_tflops"] = flop / entry["cublas_ms"] / 1e9
            if rows in autotune_rows:
                torch._dynamo.reset()
                tuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", fullgraph=True)
                torch.testing.assert_close(tuned(x, w, bias), F.linear(x, w, bias), rtol=2e-2, atol=2e-2)
                entry["autotuned_ms"] = harness.cuda_median_ms(lambda: tuned(x, w, bias))
                entry["autotuned_tflops"] = flop / entry["autotuned_ms"] / 1e9
            results["rows"][f"{rows}x{k}->{n}"] = entry
            print(rows, k, n, json.dumps(entry), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
