"""The CUDA attention kernels context-parallel attention can call, checked and timed on one GPU.

Every kernel that returns a log-sum-exp (para_fx.runtime.attention.LSE_KERNELS, and cuDNN with a mask as
a candidate) against a float64 reference of output and log-sum-exp, on uneven lengths with and
without key masks; then each one's time at the shapes FLUX at 1024 px runs per rank on 2 GPUs.

    python bench/attention_kernels.py [OUT.json]
"""

import json
import sys

import torch

from para_fx.runtime.attention import LSE_KERNELS, _aligned_bias, attention, lse_kernel

CHECKS = [  # (batch, heads, query len, key len, head dim, masked)
    (1, 4, 37, 53, 64, False),
    (1, 4, 37, 53, 64, True),
    (2, 3, 129, 77, 128, False),
    (2, 3, 129, 77, 128, True),
    (1, 24, 2305, 2303, 128, False),
]
TIMED = {"ulysses2_12x4608": (1, 12, 4608, 4608), "ring2_block_24x2304": (1, 24, 2304, 2304)}


def inputs(b, h, lq, lk, d, masked, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for n in (lq, lk, lk))
    bias = None
    if masked:  # a different number of padded keys per sample
        keep = torch.tensor([lk - 1 - 5 * i for i in range(b)], device="cuda")
        bias = torch.zeros(b, 1, 1, lk, device="cuda", dtype=dtype).masked_fill(
            torch.arange(lk, device="cuda")[None, None, None, :] >= keep[:, None, None, None], float("-inf"))
    return q, k, v, bias


def reference(q, k, v, bias, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.double()
    return torch.softmax(scores, -1) @ v.double(), torch.logsumexp(scores, -1)


def cudnn_masked(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, _aligned_bias(bias).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), True, 0.0, False, False,
        scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])


def check(results):
    for b, h, lq, lk, d, masked in CHECKS:
        q, k, v, bias = inputs(b, h, lq, lk, d, masked)
        scale = d ** -0.5
        want_out, want_lse = reference(q, k, v, bias, scale)
        kernels = dict(LSE_KERNELS, cudnn_masked=cudnn_masked) if masked else LSE_KERNELS
        row = {"picked": lse_kernel(q.dtype, d, masked, torch.cuda.get_device_capability(), True)}
        for name, fn in kernels.items():
            try:
                out, lse = fn(q, k, v, bias, scale)
                row[name] = dict(
                    out_rel=((out.double() - want_out).norm() / want_out.norm()).item(),
                    lse_max_abs=(lse.double() - want_lse).abs().max().item(),
                )
            except Exception as error:
                row[name] = f"{type(error).__name__}: {error}"[:200]
        out = attention(q, k, v, bias, scale)
        row["sdpa_no_lse"] = dict(out_rel=((out.double() - want_out).norm() / want_out.norm()).item())
        results[f"check_b{b}_h{h}_q{lq}_k{lk}_d{d}{'_masked' if masked else ''}"] = row


def time_ms(fn, iters=30):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iters, 4)


def timings(results):
    for name, (b, h, lq, lk) in TIMED.items():
        q, k, v, _ = inputs(b, h, lq, lk, 128, False)
        row = {kernel: time_ms(lambda: fn(q, k, v, None, 128 ** -0.5)) for kernel, fn in LSE_KERNELS.items()}
        row["sdpa_no_lse"] = time_ms(lambda: attention(q, k, v, None, 128 ** -0.5))
        results[f"ms_{name}"] = row


if __name__ == "__main__":
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    check(results)
    timings(results)
    text = json.dumps(results, indent=1)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)
