"""Ring attention's two ways of bringing the other ranks' keys/values, checked and timed on the GPUs:
``ring_kv="pass"`` (one block per step, partial outputs merged by log-sum-exp) and ``"gather"`` (all
blocks gathered, heads in two chunks, one kernel per chunk), at the shapes FLUX runs per rank.

    torchrun --nproc_per_node=2 bench/ring_kv.py OUT.json

Each variant is compiled with Inductor (fullgraph), as the backend emits it, and checked against
SDPA of the whole sequence on one GPU; times are CUDA-event medians per call, the slowest rank's.
"""

import json
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import para_fx  # noqa: E402
from para_fx.core.mesh import mesh_info  # noqa: E402
from para_fx.core.placement import plain  # noqa: E402
from para_fx.runtime.attention import RING_KV, sharded_attention  # noqa: E402

SHAPES = {"flux_1024": (1, 24, 4608, 128), "flux_2048": (1, 24, 16896, 128)}  # global [B, H, S, D]


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    mesh = para_fx.init_mesh(ring=world, ulysses=1)
    info = mesh_info(mesh)
    results = {"world": world, "torch": torch.__version__, "shapes": {}}
    for name, (b, h, s, d) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        want = torch.tensor_split(F.scaled_dot_product_attention(q, k, v), world, dim=2)[rank].float()
        ql, kl, vl = (torch.tensor_split(x, world, dim=2)[rank].contiguous() for x in (q, k, v))
        row = {}
        for ring_kv in RING_KV:
            def call(q, k, v, ring_kv=ring_kv):
                return sharded_attention(q, k, v, info, q_layout=plain(s), kv_layout=plain(s), bias=None,
                                         scale=d ** -0.5, ring_kv=ring_kv)
            torch._dynamo.reset()
            compiled = torch.compile(call, fullgraph=True, dynamic=False)
            out = compiled(ql, kl, vl)
            error = ((out.float() - want).norm() / want.norm()).item()
            ms = harness.cuda_median_ms(lambda: compiled(ql, kl, vl))
            slowest = [None] * world
            dist.all_gather_object(slowest, ms)
            row[ring_kv] = {"ms": max(slowest), "relative_l2": error}
        results["shapes"][name] = row
        if rank == 0:
            print(name, json.dumps(row), flush=True)
    if rank == 0 and len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
