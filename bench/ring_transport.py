"""Ring 2's key/value transfer carried by NCCL kernels or by the copy engines (symmetric memory):
how long a transfer of FLUX's block takes, how much it slows the matmuls it overlaps, and whether a
small FLUX compiled by Inductor with CUDA graphs gives the same output with either transport.

    torchrun --nproc_per_node=2 bench/ring_transport.py OUT.json

NCCL's send/receive kernels run on SMs, so the matmuls and attention they overlap lose those SMs;
the copy engines take none.
"""

import json
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed._functional_collectives as funcol  # noqa: E402

import para_fx  # noqa: E402
from para_fx.core.mesh import mesh_info  # noqa: E402
from para_fx.runtime.attention import RING_TRANSPORTS, _pass_to_next  # noqa: E402
from para_fx.testing import dits, zoo  # noqa: E402


def timed_ms(fn, iters: int = 20) -> float:
    """Median of ``iters`` timed calls (after two warm-up calls), in ms, the slowest rank's."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    median = torch.tensor(sorted(times)[len(times) // 2], device="cuda")
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return round(median.item(), 4)


def transfers(info, tokens: int) -> dict:
    """FLUX's keys and values of one block at ``tokens`` tokens per rank: [2, 1, 24, tokens, 128] bf16."""
    kv = torch.randn(2, 1, 24, tokens, 128, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(tokens, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16)
    matmuls = lambda: [a @ w for _ in range(4)]  # noqa: E731  about as long as one transfer
    row = {"bytes": kv.numel() * kv.element_size(), "matmuls_alone_ms": timed_ms(matmuls)}
    for transport in RING_TRANSPORTS:
        got = _pass_to_next(kv, info, transport)
        others = [torch.empty_like(kv) for _ in range(2)]
        dist.all_gather(others, kv)
        row[f"{transport}_correct"] = bool(torch.equal(got, others[1 - info.ring_rank]))

        def exchange(overlapped=lambda: None, transport=transport):
            received = _pass_to_next(kv, info, transport)  # in flight while ``overlapped`` runs
            overlapped()
            return funcol.wait_tensor(received)

        row[f"{transport}_alone_ms"] = timed_ms(exchange)
        row[f"{transport}_with_matmuls_ms"] = timed_ms(lambda: exchange(matmuls))
    return row


def compiled_flux(mesh) -> dict:
    """A small FLUX compiled by Inductor with CUDA graphs, each transport against eager."""
    model, kwargs = zoo.flux(height=32, width=48, text_len=24)
    model = model.to("cuda", torch.bfloat16)
    kwargs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else None) if isinstance(v, torch.Tensor) else v
              for k, v in kwargs.items()}
    out = {}
    with torch.no_grad():
        expected = dits.first_tensor(model(**kwargs)).float()
        results = {}
        for transport in RING_TRANSPORTS:
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, ring_transport=transport),
                                     mode="reduce-overhead")
            for _ in range(3):  # warm-up, record, replay
                got = dits.first_tensor(compiled(**kwargs)).float().clone()
            results[transport] = got
            out[f"{transport}_rel_err_vs_eager"] = ((got - expected).norm() / expected.norm()).item()
        out["max_abs_diff_between_transports"] = (results["nccl"] - results["copy_engine"]).abs().max().item()
    return out


def save(result: dict) -> None:
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=1), flush=True)
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


def main() -> None:
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = para_fx.init_mesh(ring=2, ulysses=1)
    info = mesh_info(mesh)
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
              "transfers": {str(t): transfers(info, t) for t in (2304, 8448)}}
    save(result)
    result["compiled_flux_cudagraphs"] = compiled_flux(mesh)
    save(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
