"""What the benchmarks share: random-weight FLUX.1-dev / HunyuanVideo-shaped transformers built
straight on the device, per-step timing, and result files that several runs merge into.

Weights are random because the benchmarks measure speed, not images: the models are built on the
meta device, materialised in their final dtype with ``to_empty`` and filled with a seeded normal
draw, so a 12B-parameter model is ready in seconds without a download or a float32 copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import Any, Callable, Iterator

import torch

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_TINY = dict(FLUX_DEV, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                 num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))

# HunyuanVideo's transformer config (hunyuanvideo-community/HunyuanVideo, transformer/config.json).
HUNYUAN_VIDEO = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)
HUNYUAN_TINY = dict(HUNYUAN_VIDEO, in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=32,
                    num_layers=2, num_single_layers=2, text_embed_dim=64, pooled_projection_dim=32,
                    rope_axes_dim=(8, 12, 12))

H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM dense bf16 peak; the H200 has the same tensor cores


def random_init_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded N(0, std) matrices, unit norm scales, zero biases: activations stay finite through
    every block in bf16, so cache decisions (which compare residual norms) are meaningful."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std, generator=gen)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def materialise(cls: type, config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """``cls(**config)`` with random weights, built in ``dtype`` directly on ``device``."""
    with torch.device("meta"):
        model = cls(**config)
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)  # diffusers' own .to() warns about dtypes
    if any(b.device.type == "meta" for b in model.buffers()):
        raise RuntimeError(f"{cls.__name__} has buffers that to_empty cannot fill")
    random_init_(model, seed)
    return model.eval().requires_grad_(False)


def build_flux(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return materialise(FluxTransformer2DModel, dict(FLUX_TINY if tiny else FLUX_DEV, **overrides), device, dtype, seed)


def flux_step_inputs(model: torch.nn.Module, resolution: int, text_len: int, steps: int, seed: int = 0) -> list[dict]:
    """One kwargs dict per denoising step at ``resolution`` pixels: the prompt is fixed, latents are
    fresh and the timestep falls, as in a sampler, so a cache sees a real change between steps.

    FLUX's VAE downsamples 8x and the transformer packs 2x2 latent patches: 1024 px -> 64x64 =
    4096 image tokens of 64 channels.
    """
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator(device).manual_seed(seed)
    side = resolution // 16
    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    prompt = dict(
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=gen, device=device, dtype=dtype),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen, device=device, dtype=dtype),
        img_ids=img_ids.reshape(side * side, 3),
        txt_ids=torch.zeros(text_len, 3, device=device),
        guidance=torch.full((1,), 3.5, device=device, dtype=dtype),
        return_dict=False,
    )
    return [
        dict(
            prompt,
            hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=gen, device=device, dtype=dtype),
            timestep=torch.full((1,), 1.0 - step / steps, device=device, dtype=dtype),
        )
        for step in range(steps)
    ]


def build_hunyuan_video(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return materialise(HunyuanVideoTransformer3DModel, HUNYUAN_TINY if tiny else HUNYUAN_VIDEO, device, dtype, seed)


def hunyuan_step_inputs(model: torch.nn.Module, height: int, width: int, frames: int, text_len: int, steps: int,
                        seed: int = 0) -> list[dict]:
    """One kwargs dict per step for a ``frames`` x ``height`` x ``width`` pixel video: the VAE
    compresses 4x in time (plus the first frame) and 8x in space, the transformer patches 1x2x2,
    so 720p x 129 frames -> 33 x 45 x 80 = 118800 tokens."""
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator(device).manual_seed(seed)
    latent_shape = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    prompt = dict(
        encoder_hidden_states=torch.randn(1, text_len, cfg.text_embed_dim, generator=gen, device=device, dtype=dtype),
        encoder_attention_mask=torch.ones(1, text_len, device=device, dtype=torch.bool),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen, device=device, dtype=dtype),
        guidance=torch.full((1,), 6000.0, device=device, dtype=dtype),
        return_dict=False,
    )
    return [
        dict(
            prompt,
            hidden_states=torch.randn(*latent_shape, generator=gen, device=device, dtype=dtype),
            timestep=torch.full((1,), int(1000 * (1 - step / steps)), device=device, dtype=torch.long),
        )
        for step in range(steps)
    ]


def quantize_fp8(model: torch.nn.Module, granularity: str) -> None:
    """torchao's dynamic fp8 activations x fp8 weights on every Linear, scaled per ``"row"`` or per
    ``"tensor"``. ``set_inductor_config`` is off so that fp8 compiles with the same Inductor
    settings as bf16 and the two differ only in the arithmetic."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    scale = {"row": PerRow(), "tensor": PerTensor()}[granularity]
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=scale, set_inductor_config=False))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_seconds(step: Callable[[dict], Any], inputs: dict, device: torch.device) -> float:
    """Wall time of one call, finished on the device: for a compiled model, its compile time."""
    synchronize(device)
    start = time.perf_counter()
    step(inputs)
    synchronize(device)
    return time.perf_counter() - start


def step_times_ms(step: Callable[[dict], Any], inputs: list[dict], device: torch.device, warmup: int,
                  iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` untimed ones, cycling through the
    per-step inputs; CUDA events on a GPU, the host clock after a sync elsewhere."""
    with gpu_turn():
        return _step_times_ms(step, inputs, device, warmup, iters)


def _step_times_ms(step, inputs, device, warmup, iters) -> list[float]:
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    synchronize(device)
    times = []
    for i in range(iters):
        kwargs = inputs[(warmup + i) % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(kwargs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step(kwargs)
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def pipelined_step_times_ms(step: Callable[[dict], Any], inputs: list[dict], device: torch.device,
                            iters: int) -> list[float] | None:
    """Milliseconds of each of ``iters`` calls enqueued back to back, nothing reading a result in
    between, as a sampling loop runs them (diffusers' schedulers keep their step sizes on the host):
    a step's host work then runs while the device works on the step before, where
    :func:`step_times_ms`, which waits for each step, adds it to the step. An event between each two
    calls times each one on the device. CUDA only."""
    if device.type != "cuda":
        return None
    with gpu_turn():
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        events[0].record()
        for i in range(iters):
            step(inputs[i % len(inputs)])
            events[i + 1].record()
        events[-1].synchronize()
    return [begin.elapsed_time(end) for begin, end in zip(events, events[1:])]


def cuda_median_ms(fn: Callable[[], Any], repeat: int = 30, warmup: int = 3) -> float:
    """Median CUDA-event time of ``fn()`` in ms, one event pair per call (kernel-level benches)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def kernel_ms_by_name(fn: Callable[[], Any], calls: int = 10, width: int = 120) -> dict[str, float]:
    """Device milliseconds per call of ``fn()`` under the profiler, by kernel name (its first
    ``width`` characters), largest first: what the one-pattern probes report."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by_name: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name[:width]] = by_name.get(event.name[:width], 0.0) + event.device_time_total / 1e3 / calls
    return dict(sorted(by_name.items(), key=lambda item: -item[1]))


def compiled_kernels(module: torch.nn.Module, args: tuple, kwargs: dict, setting: dict, calls: int = 10,
                     width: int = 120) -> tuple[dict[str, float], float]:
    """What the one-pattern probes measure of ``torch.compile(module)`` under the Inductor config
    patches ``setting`` (an ``inductor_choices_class`` among them installed too): its kernel
    milliseconds per call by name (:func:`kernel_ms_by_name`, after 3 warm-up calls) and its
    relative error against the module run eagerly."""
    from torch._inductor import config

    from para_fx.core.inductor_choices import choices_of

    with config.patch(setting), choices_of(setting), torch.no_grad():
        compiled = torch.compile(module)
        expected = module(*args, **kwargs)
        for _ in range(3):
            got = compiled(*args, **kwargs)
        torch.cuda.synchronize()
        kernels = kernel_ms_by_name(lambda: compiled(*args, **kwargs), calls, width=width)
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    return kernels, error


def measure_settings(settings: dict[str, dict], labels: str, measure: Callable[[dict], dict],
                     summary: Callable[[dict], Any]) -> dict[str, dict]:
    """``measure(settings[label])`` for each of the comma-separated ``labels``, each printed as
    ``summary`` gives it; a setting this torch rejects is recorded as its error, the others still run."""
    results = {}
    for label in labels.split(","):
        try:
            results[label] = measure(settings[label])
        except Exception as error:
            results[label] = {"error": repr(error)[:400]}
        print(label, results[label] if "error" in results[label] else summary(results[label]), flush=True)
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def flops_per_call(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def kernel_profile(step: Callable[[dict], Any], inputs: list[dict], device: torch.device, calls: int = 2,
                   top: int = 15, trace: str | None = None) -> dict:
    """Device kernels of ``calls`` calls (after the caller's warm-up): per-call totals, split into
    matmul / attention / other, the ``top`` kernels by time, and the time no kernel runs at all
    (the host not keeping up, or ranks waiting). ``trace``: a Chrome trace file to write."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with gpu_turn(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        synchronize(device)
        begin = time.perf_counter()
        for i in range(calls):
            step(inputs[i % len(inputs)])
        synchronize(device)
        wall_us = (time.perf_counter() - begin) * 1e6
    if trace:
        prof.export_chrome_trace(trace)
    by_name: dict[str, list[float]] = {}
    comm, compute = [], []
    for event in prof.events():
        # c10d's "nccl:*" ranges are annotations on the device timeline, not kernels
        if event.device_type != DeviceType.CUDA or event.is_user_annotation or event.name.startswith("nccl:"):
            continue
        entry = by_name.setdefault(event.name, [0.0, 0])
        entry[0] += event.device_time_total / 1e3 / calls
        entry[1] += 1 / calls
        span = (event.time_range.start, event.time_range.end)
        (comm if "nccl" in event.name.lower() else compute).append(span)
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0, "nccl": 0.0}
    for name, (ms, _) in by_name.items():
        kinds["nccl" if "nccl" in name.lower() else _kernel_kind(name)] += ms
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    return {
        "wall_ms_per_call": round(wall_us / 1e3 / calls, 3),
        "kernel_ms_per_call": round(sum(ms for ms, _ in by_name.values()), 3),
        "kernels_per_call": round(sum(count for _, count in by_name.values())),
        "ms_by_kind": {kind: round(ms, 3) for kind, ms in kinds.items()},
        "compute_busy_ms_per_call": round(_covered_us(compute) / 1e3 / calls, 3),
        "idle_ms_per_call": round((wall_us - _covered_us(comm + compute)) / 1e3 / calls, 3),
        "nccl_ms_per_call": round(_covered_us(comm) / 1e3 / calls, 3),
        "exposed_nccl_ms_per_call": round(_exposed_us(comm, compute) / 1e3 / calls, 3),
        "top": [{"kernel": name[:160], "ms": round(ms, 3), "count": round(count)} for name, (ms, count) in ranked[:top]],
        "top_host": _host_ops(prof, calls, top),
    }


def host_profile(step: Callable[[dict], Any], inputs: list[dict], calls: int = 5, top: int = 20) -> dict:
    """The host's own time per call, measured while a sleep kernel keeps the GPU busy so that no
    call waits on the device (a call that synchronises shows up as about a second), and the Python
    functions that take the most of it (cProfile, self time). This is the time a step costs before
    its first kernel when the caller synchronises between steps, as step_times_ms does."""
    import cProfile
    import pstats

    def busy_calls(n: int) -> list[float]:
        times = []
        for i in range(n):
            torch.cuda.synchronize()
            torch.cuda._sleep(2_000_000_000)  # about a second of GPU cycles
            begin = time.perf_counter()
            step(inputs[i % len(inputs)])
            times.append((time.perf_counter() - begin) * 1e3)
        torch.cuda.synchronize()
        return times

    with gpu_turn():
        times = busy_calls(calls)
        profiler = cProfile.Profile()
        profiler.enable()
        busy_calls(calls)
        profiler.disable()
    stats = pstats.Stats(profiler).stats

    def rows(rank: int) -> list[dict]:  # rank 2: self time, 3: cumulative (where each layer's time goes)
        ranked = sorted(stats.items(), key=lambda item: -item[1][rank])[:top]
        return [{"function": f"{os.path.basename(file)}:{line}({name})"[:160], "self_ms": round(tt * 1e3 / calls, 3),
                 "cum_ms": round(ct * 1e3 / calls, 3), "calls": round(nc / calls, 1)}
                for (file, line, name), (_, nc, tt, ct, _) in ranked]

    return {
        "host_ms_per_call": round(median(times), 3),
        "host_ms_by_call": [round(t, 3) for t in times],
        "top_python": rows(2),
        "top_python_cumulative": rows(3),
    }


def _host_ops(prof, calls: int, top: int) -> list[dict]:
    """The host ops that take the most of the host's own time (where a step short of kernels waits)."""
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key[:160], "self_ms": round(e.self_cpu_time_total / 1e3 / calls, 3), "count": round(e.count / calls)}
            for e in rows]


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _covered_us(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in _union(spans))


def _exposed_us(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Time some communication kernel runs while no compute kernel does: communication nothing hides."""
    hidden = 0.0
    busy = _union(compute)
    for start, end in _union(comm):
        for a, b in busy:
            hidden += max(0.0, min(end, b) - max(start, a))
    return _covered_us(comm) - hidden


def _kernel_kind(name: str) -> str:
    """Inductor names its Triton kernels after the aten ops fused into them ("triton_red_fused__scaled_mm_...",
    "..._scaled_dot_product_cudnn_attention_..."): a pointwise or reduction kernel counts as "other",
    only its matmul templates ("triton_tem_") as matmuls."""
    lowered = name.lower()
    if lowered.startswith(("triton_poi", "triton_red", "triton_per")):
        return "other"
    if any(key in lowered for key in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(key in lowered for key in ("gemm", "nvjet", "sm90_xmma", "cutlass", "mm_", "_mm", "matmul", "scaled_mm")):
        return "matmul"
    return "other"


def environment(device: torch.device) -> dict:
    """Versions and the device name, for the result file's header."""
    import importlib.metadata as metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    info = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": version("diffusers"),
        "torchao": version("torchao"),
        "para_attn": _para_attn_version(),
    }
    return info


def _para_attn_version() -> str | None:
    try:
        import para_attn
    except ImportError:
        return None
    return getattr(para_attn, "__version__", "unknown")


class ResultFile:
    """A JSON result that several runs merge into: ``--only`` subsets, one after another or in
    concurrent processes. Changes are kept as a list and replayed onto the file's current content
    under a lock at each save, so no process overwrites another's rows."""

    def __init__(self, path: str, fresh: bool):
        self.path = path
        self.changes: list[tuple[str, str | None, str, Any]] = []
        self.data: dict = {}
        if fresh:
            self.changes.append(("clear", None, "", None))
        elif os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def put(self, section: str | None, key: str, value: Any) -> None:
        """``data[section][key] = value`` (``data[key]`` when section is None)."""
        self.changes.append(("put", section, key, value))
        _apply(self.data, self.changes[-1])

    def drop(self, section: str, key: str) -> None:
        self.changes.append(("drop", section, key, None))
        _apply(self.data, self.changes[-1])

    def append(self, key: str, value: Any) -> None:
        self.changes.append(("append", None, key, value))
        _apply(self.data, self.changes[-1])

    def save(self, derive: Callable[[dict], None]) -> dict:
        """Replay this run's changes onto the file, ``derive`` the summary, write; the merged data."""
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(_lock_path(self.path), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data: dict = {}
            if os.path.exists(self.path):
                with open(self.path) as f:
                    data = json.load(f)
            for change in self.changes:
                _apply(data, change)
            derive(data)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        self.changes = [change for change in self.changes if change[0] != "clear"]
        self.data = data
        return data


def _lock_path(path: str) -> str:
    """A lock file for ``path`` outside its folder, so that result folders hold results only."""
    import hashlib
    import tempfile

    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"bench_results_{digest}.lock")


def _apply(data: dict, change: tuple[str, str | None, str, Any]) -> None:
    op, section, key, value = change
    if op == "clear":
        data.clear()
        return
    target = data if section is None else data.setdefault(section, {})
    if op == "put":
        target[key] = value
    elif op == "drop":
        target.pop(key, None)
    elif op == "append" and value not in target.setdefault(key, []):
        target[key].append(value)


@contextlib.contextmanager
def gpu_turn() -> Iterator[None]:
    """Exclusive use of the GPU for timed work when ``BENCH_GPU_LOCK`` names a lock file: lets
    several benchmark processes compile at once while their timed phases take turns."""
    path = os.environ.get("BENCH_GPU_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def free_memory() -> None:
    """Drop compiled code and cached allocator blocks between configurations."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fresh_inductor_cache() -> str:
    """Point Inductor and Triton at an empty cache for this process, and stop graph-level caching,
    so that every configuration's compile time is a cold compile rather than a cache hit of an
    identical graph compiled earlier. Call before the first compile."""
    import tempfile

    root = tempfile.mkdtemp(prefix="bench_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = root
    os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    return root
