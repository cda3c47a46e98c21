"""How fast the GPUs of this host exchange data: all_to_all_single and a two-way
send/recv at the sizes one FLUX 1024 px block moves, alone and beside a matmul.

    torchrun --nproc_per_node=2 bench/nccl_probe.py OUT.json

Written to tell a slow link (transport, bandwidth) from exposed time in a step.
"""

import json
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch
import torch.distributed as dist


def timed(fn, repeat=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    out = {"world": world, "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    out["p2p"] = {f"{a}->{b}": torch.cuda.can_device_access_peer(a, b) for a in range(world) for b in range(world) if a != b}
    rows = {}
    for mib in (1, 7, 14, 28, 56):
        n = mib * 2**20 // 2
        x = torch.randn(n * world, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        ms = timed(lambda: dist.all_to_all_single(y, x))
        peer = (rank + 1) % world
        recv = torch.empty(n, device="cuda", dtype=torch.bfloat16)

        def sendrecv():
            ops = [dist.P2POp(dist.isend, x[:n], peer), dist.P2POp(dist.irecv, recv, peer)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()

        ms_p2p = timed(sendrecv)
        rows[f"{mib}MiB_per_peer"] = {
            "all_to_all_ms": round(ms, 4),
            "all_to_all_GBps_per_peer": round(mib * 2**20 * (world - 1) / ms / 1e6, 1),
            "sendrecv_ms": round(ms_p2p, 4),
            "sendrecv_GBps": round(mib * 2**20 / ms_p2p / 1e6, 1),
        }
    # The same transfer while a matmul of one projection's size runs on the compute stream.
    a = torch.randn(2304, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(7 * 2**20 // 2 * world, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    stream = torch.cuda.Stream()
    mm = timed(lambda: a @ w)

    def overlapped():
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dist.all_to_all_single(y, x)
        for _ in range(4):
            a @ w
        torch.cuda.current_stream().wait_stream(stream)

    rows["overlap_7MiB_a2a_with_4_matmuls_2304x3072x3072"] = {
        "matmul_ms": round(mm, 4), "together_ms": round(timed(overlapped), 4)}
    out["rows"] = rows
    if rank == 0:
        print(json.dumps(out, indent=1))
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as f:
                json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
