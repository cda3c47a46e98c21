"""Compile time of para on a FLUX.1-dev-shaped transformer (1024 px, 512 text tokens): the whole
graph against shared blocks (``backend(shared_blocks=True)``: each distinct block compiled once),
cold (empty Inductor caches) and warm (a new process reusing them), with each one's step time:

    python bench/compile_time.py --world 1
    python bench/compile_time.py --world 2
    python bench/compile_time.py --world 2 --tiny --backend gloo    # CPU check of the script

Every configuration is its own torchrun job, so "warm" is a new process, as after a server
restart; ``TORCHINDUCTOR_CACHE_DIR`` (and Triton's) point at a per-variant directory that the cold
job starts empty and the warm job reuses. A shared-blocks job also times its first call at a
second resolution (768 px): what a resolution change costs (for the whole graph it is, by design,
a full compile, so it is not timed there). Results merge into
``bench/results/compile_time.json``, per world size: ``compile_s: {whole_cold, shared_cold,
shared_warm, ...}``, ``ms_per_step: {whole, shared}``, ``resolution_change_s: {...}`` and
``phases_s``: rank 0's first call by step (capture, each pass, the inner compiler, and Dynamo), and
``resolution_change_phases_s`` the same for the second resolution's first call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# NVLink multicast stays off (a program using it can take a shared host's GPUs down).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESOLUTION, SECOND_RESOLUTION, TEXT_LEN = 1024, 768, 512
# (variant, cache temperature) in run order: a warm job reuses its variant's cold job's caches
DEFAULT_RUNS = ("whole/cold", "shared/cold", "shared/warm")


def child(args: argparse.Namespace) -> None:
    """One torchrun job: compile, time the first call, the steps, and a second resolution's first call."""
    import torch.distributed as dist

    import para_fx
    from para_fx.core.backend import recording

    dist.init_process_group(args.backend)
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    world = dist.get_world_size()
    scale = 8 if args.tiny else 1
    with torch.no_grad():
        model = harness.build_flux(args.tiny, device, torch.bfloat16)
        text_len = 16 if args.tiny else TEXT_LEN
        inputs = harness.flux_step_inputs(model, RESOLUTION // scale, text_len, steps=4)
        second = harness.flux_step_inputs(model, SECOND_RESOLUTION // scale, text_len, steps=1)
        mesh = para_fx.init_mesh(ring=world, device_type=device.type) if world > 1 else None
        backend = para_fx.backend(mesh=mesh, compiler="inductor", shared_blocks=args.variant == "shared")
        compiled = torch.compile(model, backend=backend)

        def step(kwargs):
            return compiled(**kwargs)

        with recording() as report:  # where the first call's time goes, step by step
            compile_s = harness.first_call_seconds(step, inputs[0], device)
        ms = harness.median(harness.step_times_ms(step, inputs, device, args.warmup, args.iters))
        change_s, change_report = 0.0, None
        if args.variant == "shared":
            with recording() as change_report:
                change_s = harness.first_call_seconds(step, second[0], device)
    slowest = torch.tensor([compile_s, ms, change_s], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        compile_s, ms, change_s = slowest.tolist()
        measured = {"compile_s": compile_s, "ms": ms, "resolution_change_s": change_s, "phases_s": phases(report, compile_s)}
        if change_report is not None:
            measured["resolution_change_phases_s"] = phases(change_report, change_s)
        with open(args.fragment, "w") as f:
            json.dump(measured, f)
    dist.destroy_process_group()


def phases(report, total_s: float) -> dict:
    """A first call's seconds by step; what no step of para's claims is Dynamo's (and the rest)."""
    steps = {name: round(seconds, 2) for name, seconds in report.compile_seconds().items()}
    steps["dynamo and the rest"] = round(total_s - sum(steps.values()), 2)
    return steps


def launch(args: argparse.Namespace, variant: str, cache: str, fragment: str) -> dict:
    """Run one configuration as a torchrun job with its Inductor/Triton caches under ``cache``."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world}", "--master_port", str(args.port),
        os.path.abspath(__file__), "--child", variant, "--fragment", fragment, "--backend", args.backend,
        "--warmup", str(args.warmup), "--iters", str(args.iters), *(["--tiny"] if args.tiny else []),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, timeout=args.timeout, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(fragment):
        raise RuntimeError(f"exit {done.returncode} after {time.perf_counter() - started:.0f} s: {done.stderr[-1500:]}")
    with open(fragment) as f:
        return json.load(f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated variant/temperature pairs")
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX at 1/8 the resolution: checks the script")
    parser.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per job")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--out", default=None, help="default bench/results/compile_time[_tiny].json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fragment", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if args.child:
        args.variant = args.child
        child(args)
        return 0
    out = args.out or os.path.join(HERE, "results", f"compile_time{'_tiny' if args.tiny else ''}.json")
    scratch = tempfile.mkdtemp(prefix="compile_time_")
    world = str(args.world)
    results = harness.ResultFile(out, fresh=False)
    device = torch.device("cuda" if args.backend == "nccl" else "cpu")
    for key, value in harness.environment(device).items():
        results.put(None, key, value)
    results.append("commands", "python bench/compile_time.py " + " ".join(sys.argv[1:]))
    for run in (r.strip() for r in args.runs.split(",") if r.strip()):
        variant, temperature = run.split("/")
        cache = os.path.join(scratch, variant)
        if temperature == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        os.makedirs(cache, exist_ok=True)
        try:
            measured = launch(args, variant, cache, os.path.join(scratch, f"{variant}_{temperature}.json"))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"[compile_time] world {world} {run} failed: {error}", flush=True)
            results.put("errors", f"{world}/{run}", str(error)[-2000:])
            results.save(lambda data: None)
            continue
        row = results.data.get(world, {})
        row.setdefault("compile_s", {})[f"{variant}_{temperature}"] = round(measured["compile_s"], 2)
        if variant == "shared":
            row.setdefault("resolution_change_s", {})[f"{variant}_{temperature}"] = round(measured["resolution_change_s"], 2)
        row.setdefault("ms_per_step_by_run", {})[f"{variant}_{temperature}"] = round(measured["ms"], 3)
        row.setdefault("phases_s", {})[f"{variant}_{temperature}"] = measured["phases_s"]  # rank 0's
        if "resolution_change_phases_s" in measured:
            row.setdefault("resolution_change_phases_s", {})[f"{variant}_{temperature}"] = measured["resolution_change_phases_s"]
        if temperature == "cold":
            row.setdefault("ms_per_step", {})[variant] = round(measured["ms"], 3)
        results.put(None, world, row)
        results.drop("errors", f"{world}/{run}")
        results.save(lambda data: None)  # after every job: a run cut short keeps what it measured
        print(f"[compile_time] world {world} {run}: first call {measured['compile_s']:.1f} s, "
              f"{measured['ms']:.2f} ms/step, {SECOND_RESOLUTION} px first call {measured['resolution_change_s']:.1f} s "
              "(shared blocks only)",
              flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
