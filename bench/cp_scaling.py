"""Context-parallel scaling: ms per denoising step of a FLUX.1-dev-shaped transformer (1024 and
2048 px) and, as an option, a HunyuanVideo-shaped one (720p x 129 frames), for every Ulysses /
Ring / hybrid mesh of the world, with and without fp8, next to ParaAttention (+ torch.compile) on
the same meshes, in one torchrun job per world size:

    for n in 1 2 4 8; do torchrun --nproc_per_node=$n bench/cp_scaling.py; done
    torchrun --nproc_per_node=2 bench/cp_scaling.py --tiny --backend gloo --compiler aot_eager   # CPU check

Each job merges its world size into ``bench/results/cp_<kind>.json``: per model,
``<model>_ms_per_step = {"para": {"1": ms, "2": ms, ...}, "para_fp8": {...}, "paraattention": {...}}``
holds the best mesh of each world, ``<model>_best_mesh`` names it, and ``runs`` keeps every mesh.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

# NVLink multicast stays off (a program using it can take a shared host's GPUs down).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from para_fx.runtime.attention import RING_KV, RING_TRANSPORTS  # noqa: E402

MODELS = ("flux_1024", "flux_2048", "hunyuan_720p")


def meshes(world: int) -> list[tuple[int, int]]:
    """Every (ring, ulysses) split of the world, all-Ulysses first."""
    return [(ring, world // ring) for ring in range(1, world + 1) if world % ring == 0]


def mesh_name(ring: int, ulysses: int) -> str:
    if ring == ulysses == 1:
        return "single"
    if ring == 1:
        return f"ulysses{ulysses}"
    if ulysses == 1:
        return f"ring{ring}"
    return f"ring{ring}xulysses{ulysses}"


def build(model_name: str, tiny: bool, device: torch.device, text_len: int | None) -> tuple[torch.nn.Module, list[dict]]:
    """The model and its per-step inputs, identical on every rank (same seeds). Text: 512 tokens
    for FLUX (T5), 256 for HunyuanVideo (its LLaVA encoder), 16 tiny, unless ``text_len``."""
    dtype = torch.bfloat16
    if text_len is None:
        text_len = 16 if tiny else (512 if model_name.startswith("flux") else 256)
    if model_name.startswith("flux"):
        resolution = int(model_name.split("_")[1]) // (8 if tiny else 1)
        model = harness.build_flux(tiny, device, dtype)
        return model, harness.flux_step_inputs(model, resolution, text_len, steps=4)
    height, width, frames = (64, 64, 9) if tiny else (720, 1280, 129)
    model = harness.build_hunyuan_video(tiny, device, dtype)
    return model, harness.hunyuan_step_inputs(model, height, width, frames, text_len, steps=4)


class Job:
    """One torchrun job: this world size, every model, mesh and implementation asked for."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" \
            else torch.device("cpu")
        self.runs: dict[str, dict] = {}
        self.errors: dict[str, str] = {}

    def measure(self, key: str, prepare) -> None:
        """``prepare()`` -> a compiled step; times it on every rank, keeps the slowest rank's median."""
        if self.args.meshes and key.split("/")[2] not in self.args.meshes:
            return
        try:
            harness.free_memory()
            step, inputs = prepare()
            compile_s = harness.first_call_seconds(step, inputs[0], self.device)
            times = harness.step_times_ms(step, inputs, self.device, self.args.warmup, self.args.iters)
            slowest = torch.tensor([harness.median(times), compile_s], dtype=torch.float64, device=self.device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            self.runs[key] = {"ms": round(slowest[0].item(), 3), "compile_s": round(slowest[1].item(), 2)}
            if self.args.profile and self.device.type == "cuda":
                trace = None
                if self.args.trace and self.rank == 0:
                    os.makedirs(self.args.trace, exist_ok=True)
                    trace = os.path.join(self.args.trace, key.replace("/", "_") + ".json.gz")
                self.runs[key]["profile"] = harness.kernel_profile(step, inputs, self.device, top=self.args.profile_top,
                                                                   trace=trace)
            if self.rank == 0:
                print(f"[cp_scaling] world {self.world} {key}: {self.runs[key]['ms']:.2f} ms/step", flush=True)
        except Exception as error:  # one configuration failing must not lose the job
            if self.rank == 0:
                traceback.print_exc()
            self.errors[key] = f"{type(error).__name__}: {error}"[:2000]
        finally:
            harness.free_memory()
            dist.barrier()
            self.save()  # after every run: a job cut short keeps what it measured

    def para(self, model_name: str, ring: int, ulysses: int, fp8: bool, overlap: bool = True, mode: str | None = None):
        import para_fx

        model, inputs = build(model_name, self.args.tiny, self.device, self.args.text_len)
        if fp8:
            harness.quantize_fp8(model, self.args.fp8_granularity)
        mesh = para_fx.init_mesh(ring=ring, ulysses=ulysses, device_type=self.device.type) if self.world > 1 else None
        backend = para_fx.backend(mesh=mesh, compiler=self.args.compiler, **self.args.para_options)
        # without para's comm/compute reordering: the "before" of the overlap comparison
        options = None if overlap else {"reorder_for_compute_comm_overlap": False}
        compiled = torch.compile(model, backend=backend, options=options, mode=mode)
        return (lambda kwargs: compiled(**kwargs)), inputs

    def paraattention(self, model_name: str, ring: int, ulysses: int, mode: str | None = None):
        from competitors import parallelize_with_paraattention

        model, inputs = build(model_name, self.args.tiny, self.device, self.args.text_len)
        if self.world > 1:
            mesh = dist.init_device_mesh(self.device.type, (1, ring, ulysses), mesh_dim_names=("batch", "ring", "ulysses"))
            parallelize_with_paraattention(model, mesh)
        compiled = torch.compile(model, backend=self.args.compiler, mode=mode)
        return (lambda kwargs: compiled(**kwargs)), inputs

    def run(self) -> None:
        with torch.no_grad():
            for model_name in self.args.models:
                for ring, ulysses in meshes(self.world):
                    name = mesh_name(ring, ulysses)
                    if self.args.para and not self.args.cudagraphs_only:
                        self.measure(f"{model_name}/{self.args.para_label}/{name}",
                                     lambda: self.para(model_name, ring, ulysses, fp8=False))
                    label = self.args.para_label
                    if name in self.args.no_overlap and self.world > 1:
                        self.measure(f"{model_name}/{label}_no_overlap/{name}",
                                     lambda: self.para(model_name, ring, ulysses, fp8=False, overlap=False))
                    if self.args.cudagraphs:
                        self.measure(f"{model_name}/{label}_cudagraphs/{name}",
                                     lambda: self.para(model_name, ring, ulysses, fp8=False, mode="reduce-overhead"))
                    if self.args.fp8:
                        self.measure(f"{model_name}/{label}_fp8/{name}",
                                     lambda: self.para(model_name, ring, ulysses, fp8=True))
                    if self.args.paraattention and not self.args.cudagraphs_only:
                        self.measure(f"{model_name}/paraattention/{name}",
                                     lambda: self.paraattention(model_name, ring, ulysses))
                    if self.args.paraattention and self.args.cudagraphs:  # the same compile mode as para's row
                        self.measure(f"{model_name}/paraattention_cudagraphs/{name}",
                                     lambda: self.paraattention(model_name, ring, ulysses, mode="reduce-overhead"))

    def save(self) -> None:
        """Merge this world size into the kind's result file (rank 0)."""
        if self.rank != 0:
            return
        results = harness.ResultFile(self.args.out, fresh=False)
        for key, value in harness.environment(self.device).items():
            results.put(None, key, value)
        results.put(None, "backend", self.args.backend)
        results.put(None, "compiler", self.args.compiler)
        command = f"torchrun --nproc_per_node={self.world} bench/cp_scaling.py " + " ".join(sys.argv[1:])
        if command not in results.data.get("commands", []):
            results.append("commands", command)
        # merged with the rows earlier jobs of this world size wrote (other models or meshes)
        runs = {**results.data.get("runs", {}).get(str(self.world), {}), **self.runs}
        errors = {k: v for k, v in results.data.get("errors", {}).get(str(self.world), {}).items() if k not in self.runs}
        results.put("runs", str(self.world), runs)
        results.put("errors", str(self.world), {**errors, **self.errors})
        results.save(summarise)


def summarise(data: dict) -> None:
    """Per model and implementation: the best mesh's ms of each world size, which mesh that was,
    and the speed-up over world 1."""
    best: dict[tuple[str, str, str], tuple[float, str]] = {}
    for world, runs in data.get("runs", {}).items():
        for key, run in runs.items():
            model_name, impl, mesh = key.split("/")
            if (model_name, impl, world) not in best or run["ms"] < best[model_name, impl, world][0]:
                best[model_name, impl, world] = (run["ms"], mesh)
    for model_name in MODELS:
        for suffix in ("ms_per_step", "best_mesh", "speedup_vs_world1"):
            data.pop(f"{model_name}_{suffix}", None)
    for (model_name, impl, world), (ms, mesh) in sorted(best.items(), key=lambda item: int(item[0][2])):
        data.setdefault(f"{model_name}_ms_per_step", {}).setdefault(impl, {})[world] = ms
        data.setdefault(f"{model_name}_best_mesh", {}).setdefault(impl, {})[world] = mesh
    for model_name in MODELS:
        for impl, per_world in data.get(f"{model_name}_ms_per_step", {}).items():
            if "1" in per_world:
                data.setdefault(f"{model_name}_speedup_vs_world1", {})[impl] = {
                    world: round(per_world["1"] / ms, 3) for world, ms in per_world.items()
                }


def default_kind(backend: str) -> str:
    if backend == "gloo" or not torch.cuda.is_available():
        return "cpu-gloo"
    name = torch.cuda.get_device_name().lower()
    chip = next((c for c in ("h200", "h100", "b200", "a100") if c in name), name.replace(" ", "-"))
    return f"nvidia-{chip}-x{torch.cuda.device_count()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models at 1/8 the resolution: checks the script")
    parser.add_argument("--models", default="flux_1024,flux_2048", help="comma-separated from " + ", ".join(MODELS))
    parser.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    parser.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor")
    parser.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip the fp8 rows")
    parser.add_argument("--fp8-granularity", choices=("row", "tensor"), default="row")
    parser.add_argument("--no-paraattention", dest="paraattention", action="store_false")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default 512 FLUX, 256 video, 16 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (1 tiny)")
    parser.add_argument("--iters", type=int, default=None, help="default 5 (2 tiny)")
    parser.add_argument("--meshes", default=None, help="comma-separated mesh names to run (default: all), e.g. ring2,ulysses2")
    parser.add_argument("--no-overlap", default="",
                        help="comma-separated meshes on which to also run para without its comm/compute "
                             "reordering (para_no_overlap rows): the before of the overlap comparison")
    parser.add_argument("--profile", action="store_true", help="a kernel profile of each run: NCCL time and exposed NCCL time")
    parser.add_argument("--profile-top", type=int, default=15, help="with --profile: how many kernels to list, slowest first")
    parser.add_argument("--trace", default=None, help="with --profile: a folder for rank 0's Chrome traces (.json.gz)")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="also run para and ParaAttention with mode='reduce-overhead' (CUDA graphs): *_cudagraphs rows")
    parser.add_argument("--cudagraphs-only", action="store_true", help="with --cudagraphs: only the CUDA-graph rows")
    parser.add_argument("--no-para", dest="para", action="store_false", help="skip the plain para rows")
    parser.add_argument("--fuse-projections", action="store_true",
                        help="para with fuse_projections=True: rows labelled para+fuse_projections")
    parser.add_argument("--schedule-collectives", action="store_true",
                        help="para with schedule_collectives=True: rows labelled para+schedule_collectives")
    parser.add_argument("--shared-blocks", action="store_true",
                        help="para with shared_blocks=True (each distinct block compiled once): rows labelled para+shared_blocks")
    parser.add_argument("--split-vector-matmuls", action="store_true",
                        help="para with split_vector_matmuls=True (modulation matmuls split by columns): rows labelled para+split_vector_matmuls")
    parser.add_argument("--ring-kv", choices=RING_KV, default="pass",
                        help="para with ring_kv=...: rows other than pass labelled para+ring_kv_gather")
    parser.add_argument("--ring-transport", choices=RING_TRANSPORTS, default="nccl",
                        help="para with ring_transport=...: rows other than nccl labelled para+ring_transport_copy_engine")
    parser.add_argument("--kind", default=None, help="names the result file (default: GPU model and count)")
    parser.add_argument("--out", default=None, help="default bench/results/cp_<kind>.json")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.para_options = {name: True for name in ("fuse_projections", "schedule_collectives", "shared_blocks", "split_vector_matmuls")
                         if getattr(args, name)}
    if args.ring_kv != "pass":
        args.para_options["ring_kv"] = args.ring_kv
    if args.ring_transport != "nccl":
        args.para_options["ring_transport"] = args.ring_transport
    args.para_label = "+".join(["para", *(name if value is True else f"{name}_{value}" for name, value in args.para_options.items())])
    args.meshes = [m.strip() for m in args.meshes.split(",") if m.strip()] if args.meshes else []
    args.no_overlap = [m.strip() for m in args.no_overlap.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}")
    if args.backend is None:
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.iters = args.iters if args.iters is not None else (2 if args.tiny else 5)
    kind = args.kind or default_kind(args.backend)
    if args.out is None:
        here = os.path.dirname(os.path.abspath(__file__))
        args.out = os.path.join(here, "results", f"cp_{kind}{'_tiny' if args.tiny else ''}.json")
    return args


def main() -> int:
    args = parse_args()
    dist.init_process_group(args.backend)
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    try:
        job = Job(args)
        job.run()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
