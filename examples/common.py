"""What the per-model examples share: arguments, launching the ranks, timing and saving.

An example describes its model with an :class:`Example` (how to load the real checkpoint, how to
build the tiny stand-in, what it outputs) and calls :func:`main`. Launching:

* ``torchrun --nproc_per_node=N examples/X.py``: one process per GPU (NCCL), or per CPU rank
  (gloo) with ``--tiny``.
* ``python examples/X.py``: one device, no process group.
* ``python examples/X.py --tiny``: spawns ``--world-size`` (2) CPU ranks itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from para_fx.adapters.diffusers import (
    apply_cache_on_pipe,
    init_context_parallel_mesh,
    last_cache_stats,
    parallelize_pipe,
    parallelize_vae,
)
from para_fx.testing.launch import run_ranks


@dataclasses.dataclass(frozen=True)
class Example:
    """A diffusers pipeline example. ``load(args, device)`` and ``tiny(args)`` return ``(pipe, call_kwargs)``."""

    name: str
    load: Callable[[argparse.Namespace, str], tuple[Any, dict[str, Any]]]
    tiny: Callable[[argparse.Namespace], tuple[Any, dict[str, Any]]]
    fps: int | None = None  # frames per second of a video pipeline; None for images
    cache_threshold: float = 0.08  # what --cache means without a value
    max_batch_dim_size: int = 1  # 2 where the pipeline batches cond and uncond (CFG parallelism)
    max_ring_dim_size: int | None = None


def parse_args(
    description: str,
    name: str,
    *,
    out_extension: str,
    cache_threshold: float = 0.08,
    max_batch_dim_size: int = 1,
    max_ring_dim_size: int | None = None,
    argv: list[str] | None = None,
) -> argparse.Namespace:
    """The flags every example takes; defaults that depend on the model come as arguments."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="random tiny components on CPU, no download")
    p.add_argument("--world-size", type=int, default=2, help="ranks --tiny spawns when not under torchrun")
    p.add_argument("--cache", type=float, nargs="?", const=cache_threshold, default=None, metavar="THRESHOLD",
                   help=f"First Block Cache (threshold {cache_threshold} without a value)")
    p.add_argument("--fp8", action="store_true", help="fp8 dynamic quantization of the transformer (torchao)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (model default otherwise)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="video frames (video models)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--model", default=None, help="checkpoint to load instead of the default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=2, help="generations; the first one compiles")
    p.add_argument("--max-ring", type=int, default=max_ring_dim_size, help="largest ring degree")
    p.add_argument("--max-batch", type=int, default=max_batch_dim_size, help="largest CFG-batch degree")
    p.add_argument("--compiler", default=None,
                   help='inner compiler: "inductor" (default), "aot_eager" (--tiny default unless --mode), "eager"')
    p.add_argument("--mode", default=None, help='torch.compile mode for Inductor, e.g. "max-autotune-no-cudagraphs"')
    p.add_argument("--out", default=f"{name}.{out_extension}", help="output file (a video as .mp4 needs imageio; .gif does not)")
    args = p.parse_args(argv)
    if args.compiler is None:  # a mode configures Inductor, so it asks for Inductor even with --tiny
        args.compiler = "aot_eager" if args.tiny and args.mode is None else "inductor"
    elif args.mode is not None and args.compiler != "inductor":
        p.error(f"--mode configures Inductor; it cannot go with --compiler {args.compiler}")
    return args


def main(example: Example, description: str) -> None:
    """Parse the flags and run ``example``'s pipeline on every rank."""
    launch(run_pipeline, example_args(example, description), example)


def example_args(example: Example, description: str = "", argv: list[str] | None = None) -> argparse.Namespace:
    """``parse_args`` with ``example``'s defaults (``argv``: the command line's when None)."""
    return parse_args(
        description,
        example.name,
        out_extension=_default_extension(example),
        cache_threshold=example.cache_threshold,
        max_batch_dim_size=example.max_batch_dim_size,
        max_ring_dim_size=example.max_ring_dim_size,
        argv=argv,
    )


def launch(fn: Callable[..., Any], args: argparse.Namespace, *fn_args: Any) -> None:
    """``fn(args, *fn_args)`` on every rank: torchrun's, 2 spawned CPU ranks for --tiny, or one process."""
    if "RANK" in os.environ:
        backend = "gloo" if args.tiny or not torch.cuda.is_available() else "nccl"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        try:
            fn(args, *fn_args)
        finally:
            dist.destroy_process_group()
    elif args.tiny and args.world_size > 1:
        run_ranks(fn, args.world_size, args, *fn_args, timeout=1200)
    else:
        fn(args, *fn_args)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def log(message: str) -> None:
    if rank() == 0:
        print(message, flush=True)


def device_of(args: argparse.Namespace) -> str:
    if args.tiny or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}"


def quantize_fp8(module: torch.nn.Module) -> None:
    """fp8 weights and dynamically quantised fp8 activations for every linear layer (torchao)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except ImportError as e:
        raise SystemExit(f"--fp8 needs torchao: pip install torchao ({e})") from None

    quantize_(module, Float8DynamicActivationFloat8WeightConfig())


def run_pipeline(args: argparse.Namespace, example: Example) -> None:
    """Load, parallelise, optionally cache and quantise, run ``args.runs`` times, save on rank 0."""
    if args.tiny and dist.is_initialized():
        torch.set_num_threads(1)  # ranks share the CPU cores
    device = device_of(args)
    pipe, call_kwargs = example.tiny(args) if args.tiny else example.load(args, device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = init_context_parallel_mesh(
        device.split(":")[0], max_batch_dim_size=args.max_batch, max_ring_dim_size=args.max_ring
    )
    log(f"[{example.name}] {world} rank(s), mesh {dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh else 'single device'}")
    compile_kwargs = {"mode": args.mode} if args.mode else {}
    parallelize_pipe(pipe, mesh, compiler=args.compiler, **compile_kwargs)
    if world > 1:
        parallelize_vae(pipe.vae, mesh)
    if args.cache is not None:
        apply_cache_on_pipe(pipe, residual_diff_threshold=args.cache)
    if args.fp8:
        quantize_fp8(pipe.transformer)
    output = None
    for run in range(args.runs):
        begin = time.perf_counter()
        output = pipe(**call_kwargs, generator=torch.Generator(device).manual_seed(args.seed))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
        log(f"[{example.name}] {'warm-up run (compiles)' if run == 0 else f'run {run + 1}'}: {seconds:.2f} s")
        if args.cache is not None:
            stats = last_cache_stats(pipe)
            log(f"[{example.name}]   cache: {stats.computed} computed, {stats.skipped} skipped of {stats.steps} transformer calls")
    if rank() == 0:
        save(output, args.out, example.fps)
        print(f"[{example.name}] saved {args.out}", flush=True)


def save(output: Any, path: str, fps: int | None) -> None:
    """Rank 0's pipeline output: the first image, or the first video as .mp4 / .gif."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fps is None:
        output.images[0].save(path)
        return
    from diffusers.utils import export_to_gif, export_to_video

    frames = output.frames[0]
    if path.endswith(".gif"):
        if not isinstance(frames, list):  # output_type "np" (Wan's default): [frames, H, W, C] in [0, 1]
            from PIL import Image

            frames = [Image.fromarray((frame * 255).round().astype("uint8")) for frame in frames]
        export_to_gif(frames, path, fps=fps)
    else:
        export_to_video(frames, path, fps=fps)


def _default_extension(example: Example) -> str:
    if example.fps is None:
        return "png"
    return "mp4" if importlib.util.find_spec("imageio") else "gif"
