"""Context parallelism on real GPUs, FLUX.1-dev-shaped (random bf16, 1024 px): correctness
against single-GPU eager and what explain sees there, for Ulysses and Ring over the whole world.

    [PARA_OPTIONS=split_vector_matmuls,...] torchrun --nproc_per_node=2 bench/cp_check.py [OUT.json]

The para backend runs with the aot_eager inner compiler (no Inductor compile time). Eager's own
flash-vs-math SDPA difference on the same input is the bf16 noise level. ``PARA_OPTIONS``: backend
flags turned on (comma-separated), recorded in the output.
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
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import para_fx  # noqa: E402


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device())
    resolution = int(os.environ.get("RES", "1024"))
    options = {name: True for name in os.environ.get("PARA_OPTIONS", "").split(",") if name}
    out = {"world": world, "resolution": resolution, "torch": torch.__version__, "options": sorted(options)}
    with torch.no_grad():
        model = harness.build_flux(False, device, torch.bfloat16)
        inputs = harness.flux_step_inputs(model, resolution, 512, steps=2)[1]
        expected = model(**inputs)[0]
        with sdpa_kernel(SDPBackend.MATH):
            out["eager_math_vs_default_rel_err"] = relative_error(model(**inputs)[0], expected)
        for ring, ulysses in ((1, world), (world, 1)):
            mesh = para_fx.init_mesh(ring=ring, ulysses=ulysses)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="aot_eager", **options))
            row = {"rel_err": relative_error(compiled(**inputs)[0], expected)}
            torch._dynamo.reset()
            report = para_fx.explain(model, kwargs=inputs, mesh=mesh)
            row["summary"] = dict(report.summary())
            row["fallbacks"] = [f"{f.module}: {f.op} ({f.reason})" for f in report.fallbacks_by_cost()][:20]
            row["strategies"] = sorted({s.strategy for s in report.attention_sites})
            row["collective_kinds"] = sorted({c.kind for c in report.collectives})
            out[f"ring{ring}_ulysses{ulysses}"] = row
            torch._dynamo.reset()
    if rank == 0:
        text = json.dumps(out, indent=1)
        print(text, flush=True)
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as f:
                f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
