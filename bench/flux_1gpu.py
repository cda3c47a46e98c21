"""FLUX.1-dev-shaped transformer on one GPU: ms per denoising step and compile time of eager,
Inductor, the para backend (with and without its First Block Cache), fp8, ParaAttention's cache
and diffusers' cache, plus the MFU of the bf16 step.

    python bench/flux_1gpu.py                      # everything, merged into bench/results/flux_1gpu.json
    python bench/flux_1gpu.py --only eager,inductor
    python bench/flux_1gpu.py --tiny --only eager,para   # small model, CPU ok: checks the script

Each configuration gets a fresh model and its own try/except, so one failure records an error
string instead of losing the run; results are written after every configuration and merged into
the existing file, so subsets can run in separate processes (which also keeps every compile time
cold: see ``harness.fresh_inductor_cache``).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

ROWS = (
    "eager",
    "inductor",
    "inductor_max_autotune",
    "para",
    "para_cudagraphs",
    "para_cache_compute",
    "para_cache_skip",
    "inductor_fp8",
    "para_fp8",
    "para_fp8_cudagraphs",
    "paraattention",
    "diffusers_fbc",
)
COMPILE_ROWS = ("inductor", "inductor_max_autotune", "para", "para_cudagraphs", "para_cache_compute", "inductor_fp8",
                "para_fp8", "para_fp8_cudagraphs", "paraattention", "diffusers_fbc")
MFU_ROWS = ("eager", "inductor", "inductor_max_autotune", "para")
SKIP_THRESHOLD = 1e9  # every step after a session's first is close enough to skip


class Unavailable(RuntimeError):
    """A configuration that cannot run in this tree or environment (recorded, not a crash)."""


class Bench:
    """One process's run: the settings, the model factory, and the result file."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16
        self.results = harness.ResultFile(args.out, fresh=args.fresh)
        self.recorded: set[str] = set()  # rows measured by the runner in progress

    def flag(self, row: str, problem: str) -> None:
        """A measured row whose check failed: the number stays, the problem is reported with it."""
        self.results.put("errors", row, problem)

    def model(self, **overrides):
        harness.free_memory()
        return harness.build_flux(self.args.tiny, self.device, self.dtype, seed=0, **overrides)

    def compile(self, model, **options):
        """``torch.compile`` with Inductor, or with ``--compiler aot_eager`` when checking the script."""
        import torch

        if self.args.compiler != "inductor":
            options = dict(backend=self.args.compiler)
        return torch.compile(model, **options)

    def cudagraphs_mode(self) -> str | None:
        """torch.compile's CUDA-graph mode; none with ``--compiler aot_eager`` (it configures Inductor)."""
        return "reduce-overhead" if self.args.compiler == "inductor" else None

    def para_compile_options(self) -> dict:
        """torch.compile's keyword arguments for the para rows besides the backend: with
        ``--skip-module-guards``, Dynamo's guards on the model's modules and parameters are dropped
        (fewer host checks per call; a changed parameter then goes unnoticed)."""
        import torch

        if not self.args.skip_module_guards:
            return {}
        return {"options": {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}}

    def para_backend(self, **options):
        import para_fx

        return para_fx.backend(compiler=self.args.compiler, **{**self.args.para_options, **options})

    def inputs(self, model) -> list[dict]:
        return harness.flux_step_inputs(model, self.args.resolution, self.args.text_len, steps=self.args.input_sets)

    def times(self, step: Callable[[dict], Any], inputs: list[dict], warmup: int | None = None) -> list[float]:
        warmup = self.args.warmup if warmup is None else warmup
        return harness.step_times_ms(step, inputs, self.device, warmup, self.args.iters)

    def compile_and_time(self, row: str, compiled, inputs: list[dict], **details) -> None:
        step = lambda kwargs: compiled(**kwargs)  # noqa: E731
        compile_s = harness.first_call_seconds(step, inputs[0], self.device)
        times = self.times(step, inputs)
        pipelined = harness.pipelined_step_times_ms(step, inputs, self.device, self.args.iters)
        if pipelined is not None:
            ms = harness.median(pipelined)
            self.results.put("pipelined_ms_per_step", row, round(ms, 3))
            details["pipelined_times_ms"] = [round(t, 3) for t in pipelined]
            print(f"[flux_1gpu] {row}: {ms:.3f} ms/step (median) with {self.args.iters} steps enqueued back to back",
                  flush=True)
        self.record(row, times, compile_s=compile_s, **details, **self.profile(step, inputs))

    def profile(self, step: Callable[[dict], Any], inputs: list[dict]) -> dict:
        if not self.args.profile or self.device.type != "cuda":
            return {}
        found = {"profile": harness.kernel_profile(step, inputs, self.device)}
        if self.args.host_profile:
            found["host"] = harness.host_profile(step, inputs)
        return found

    def record(self, row: str, times: list[float], compile_s: float | None = None, **details) -> None:
        self.recorded.add(row)
        ms = harness.median(times)
        self.results.put("ms_per_step", row, round(ms, 3))
        if compile_s is not None:
            self.results.put("compile_s", row, round(compile_s, 2))
        self.results.drop("errors", row)
        self.results.put("details", row, dict(times_ms=[round(t, 3) for t in times], device=self.results.data.get("gpu"),
                                              **details))
        print(f"[flux_1gpu] {row}: {ms:.3f} ms/step" + (f", first call {compile_s:.1f} s" if compile_s else ""),
              flush=True)


# --- configurations ---------------------------------------------------------------------------


def run_eager(b: Bench) -> None:
    model = b.model()
    inputs = b.inputs(model)
    step = lambda kwargs: model(**kwargs)  # noqa: E731
    b.results.put(None, "flops_per_step", harness.flops_per_call(lambda: step(inputs[0])))
    b.record("eager", b.times(step, inputs, warmup=min(b.args.warmup, 2)), **b.profile(step, inputs))


def run_inductor(b: Bench) -> None:
    model = b.model()
    b.compile_and_time("inductor", b.compile(model), b.inputs(model))


def run_inductor_max_autotune(b: Bench) -> None:
    model = b.model()
    b.compile_and_time("inductor_max_autotune", b.compile(model, mode="max-autotune-no-cudagraphs"), b.inputs(model))


def run_para(b: Bench) -> None:
    import torch

    model = b.model()
    b.compile_and_time("para", torch.compile(model, backend=b.para_backend(), **b.para_compile_options()), b.inputs(model))


def run_para_cudagraphs(b: Bench) -> None:
    """para with CUDA graphs (``mode="reduce-overhead"``): one launch a step, no host work per kernel."""
    import torch

    model = b.model()
    b.compile_and_time("para_cudagraphs", torch.compile(model, backend=b.para_backend(), mode=b.cudagraphs_mode()),
                       b.inputs(model))


def run_para_cache(b: Bench) -> None:
    """One compile, two costs: threshold 0 never skips (a computed step, decision included), then
    the threshold raised without recompiling, so every step after the session's first skips."""
    import para_fx
    import torch

    if not hasattr(para_fx, "FirstBlockCache"):
        raise Unavailable("para_fx.FirstBlockCache is not implemented in this tree")
    model = b.model()
    inputs = b.inputs(model)
    cache = para_fx.FirstBlockCache(threshold=0.0, warmup_steps=0)
    compiled = torch.compile(model, backend=b.para_backend(cache=cache), **b.para_compile_options())
    step = lambda kwargs: compiled(**kwargs)  # noqa: E731

    with para_fx.cache_session(compiled):
        compile_s = harness.first_call_seconds(step, inputs[0], b.device)
    with para_fx.cache_session(compiled):
        times = b.times(step, inputs)
    stats = _stats(para_fx.cache_stats(compiled))
    computed_every_step = stats["skipped"] == 0 and stats["computed"] == b.args.warmup + b.args.iters
    b.record("para_cache_compute", times, compile_s=compile_s, cache_stats=stats,
             computed_every_step=computed_every_step, **b.profile(step, inputs))

    cache.threshold = SKIP_THRESHOLD
    with para_fx.cache_session(compiled):
        step(inputs[0])  # the computed step every later one reuses
        times = b.times(step, inputs[1:])
    stats = _stats(para_fx.cache_stats(compiled))
    skipped_every_step = stats["computed"] == 1 and stats["skipped"] == b.args.warmup + b.args.iters
    profile = {}
    if b.args.profile:  # a session of its own, after the counted one
        with para_fx.cache_session(compiled):
            step(inputs[0])
            profile = b.profile(step, inputs[1:])
    b.record("para_cache_skip", times, cache_stats=stats, skipped_every_step=skipped_every_step, **profile)
    if not computed_every_step:
        b.flag("para_cache_compute", f"threshold 0 did not compute every step: {stats}")
    if not skipped_every_step:
        b.flag("para_cache_skip", f"threshold {SKIP_THRESHOLD} did not skip every step after the first: {stats}")


def _stats(stats) -> dict:
    return {"steps": stats.steps, "computed": stats.computed, "skipped": stats.skipped,
            "diffs_head": [round(d, 4) for d in stats.diffs[:4]]}


def run_inductor_fp8(b: Bench) -> None:
    """With ``--fp8-granularity both``, the faster scale granularity is picked on a one double +
    one single block model at the same token count (compiles in seconds), then the whole model
    runs with it."""
    granularity = b.args.fp8_granularity
    if granularity == "both":
        by_granularity = {}
        for candidate in ("row", "tensor"):
            model = b.model(num_layers=1, num_single_layers=1)
            harness.quantize_fp8(model, candidate)
            compiled = b.compile(model)
            inputs = b.inputs(model)
            step = lambda kwargs: compiled(**kwargs)  # noqa: E731
            step(inputs[0])
            by_granularity[candidate] = round(harness.median(b.times(step, inputs)), 3)
        granularity = min(by_granularity, key=by_granularity.get)
        b.results.put(None, "fp8_granularity_blocks_ms", by_granularity)
        print(f"[flux_1gpu] fp8 granularity on 1+1 blocks: {by_granularity} ms -> {granularity}", flush=True)
    b.results.put(None, "fp8_granularity", granularity)
    model = b.model()
    harness.quantize_fp8(model, granularity)
    b.compile_and_time("inductor_fp8", b.compile(model), b.inputs(model), granularity=granularity)


def run_para_fp8(b: Bench) -> None:
    import torch

    granularity = b.args.fp8_granularity
    if granularity == "both":
        granularity = b.results.data.get("fp8_granularity", "row")  # what inductor_fp8 picked
    model = b.model()
    harness.quantize_fp8(model, granularity)
    b.compile_and_time("para_fp8", torch.compile(model, backend=b.para_backend()), b.inputs(model),
                       granularity=granularity)


def run_para_fp8_cudagraphs(b: Bench) -> None:
    """fp8 with CUDA graphs: torchao's per-call host work on its weight subclasses is replayed, not run."""
    import torch

    granularity = b.args.fp8_granularity
    if granularity == "both":
        granularity = b.results.data.get("fp8_granularity", "row")
    model = b.model()
    harness.quantize_fp8(model, granularity)
    compiled = torch.compile(model, backend=b.para_backend(), mode=b.cudagraphs_mode())
    b.compile_and_time("para_fp8_cudagraphs", compiled, b.inputs(model), granularity=granularity)


def run_paraattention(b: Bench) -> None:
    """ParaAttention's cache + torch.compile. Its threshold 0 returns before comparing anything,
    so the computed step runs at a tiny positive threshold: the residual comparison (and its host
    sync) is paid as in the other caches, and fresh latents each step never pass it."""
    from competitors import apply_paraattention_cache, paraattention_session

    model = b.model()
    inputs = b.inputs(model)
    counter = apply_paraattention_cache(model, b.args.text_len)
    compiled = b.compile(model)
    step = lambda kwargs: compiled(**kwargs)  # noqa: E731
    with paraattention_session(1e-6):
        compile_s = harness.first_call_seconds(step, inputs[0], b.device)
    counter.reset()
    with paraattention_session(1e-6):
        times = b.times(step, inputs)
    b.record("paraattention", times, compile_s=compile_s, threshold=1e-6, decisions=counter.as_dict(),
             **b.profile(step, inputs))
    counter.reset()
    with paraattention_session(SKIP_THRESHOLD):
        step(inputs[0])
        times = b.times(step, inputs[1:])
    decisions = counter.as_dict()
    profile = {}
    if b.args.profile:
        with paraattention_session(SKIP_THRESHOLD):
            step(inputs[0])
            profile = b.profile(step, inputs[1:])
    b.record("paraattention_skip", times, threshold=SKIP_THRESHOLD, decisions=decisions, **profile)


def run_diffusers_fbc(b: Bench) -> None:
    """diffusers' FirstBlockCache hook + torch.compile; threshold 0 computes every step whose
    first-block residual changed at all (the comparison is still made)."""
    from competitors import apply_diffusers_cache

    model = b.model()
    inputs = b.inputs(model)
    counter, head = apply_diffusers_cache(model, threshold=0.0)
    compiled = b.compile(model)
    step = lambda kwargs: compiled(**kwargs)  # noqa: E731
    with model.cache_context("bench"):
        compile_s = harness.first_call_seconds(step, inputs[0], b.device)
    model._reset_stateful_cache()  # else the next call, on the same inputs, would match and skip
    counter.reset()
    with model.cache_context("bench"):
        times = b.times(step, inputs)
    b.record("diffusers_fbc", times, compile_s=compile_s, threshold=0.0, decisions=counter.as_dict(),
             **b.profile(step, inputs))
    model._reset_stateful_cache()
    head.threshold = SKIP_THRESHOLD
    counter.reset()
    with model.cache_context("bench"):
        step(inputs[0])
        times = b.times(step, inputs[1:])
    b.record("diffusers_fbc_skip", times, threshold=SKIP_THRESHOLD, decisions=counter.as_dict())


def run_ab_para_inductor(b: Bench) -> None:
    """para and Inductor compiled side by side in one process (two models, same weights), timed in
    alternating rounds so that clock and thermal drift hit both alike: the fair test of
    para / inductor <= 1.00, where two separate runs differ by their own spread."""
    import torch

    inductor_model, para_model = b.model(), harness.build_flux(b.args.tiny, b.device, b.dtype, seed=0)
    inputs = b.inputs(inductor_model)
    contenders = {"ab_inductor": b.compile(inductor_model),
                  "ab_para": torch.compile(para_model, backend=b.para_backend())}
    steps = {row: (lambda kwargs, c=compiled: c(**kwargs)) for row, compiled in contenders.items()}
    for step in steps.values():
        step(inputs[0])
    times: dict[str, list[float]] = {row: [] for row in steps}
    for round_index in range(b.args.ab_rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for row in order:
            times[row] += b.times(steps[row], inputs)
    for row, values in times.items():
        b.record(row, values, rounds=b.args.ab_rounds)


RUNNERS: dict[str, tuple[Callable[[Bench], None], tuple[str, ...]]] = {
    "eager": (run_eager, ("eager",)),
    "inductor": (run_inductor, ("inductor",)),
    "inductor_max_autotune": (run_inductor_max_autotune, ("inductor_max_autotune",)),
    "para": (run_para, ("para",)),
    "para_cudagraphs": (run_para_cudagraphs, ("para_cudagraphs",)),
    "para_cache": (run_para_cache, ("para_cache_compute", "para_cache_skip")),
    "inductor_fp8": (run_inductor_fp8, ("inductor_fp8",)),
    "para_fp8": (run_para_fp8, ("para_fp8",)),
    "para_fp8_cudagraphs": (run_para_fp8_cudagraphs, ("para_fp8_cudagraphs",)),
    "paraattention": (run_paraattention, ("paraattention", "paraattention_skip")),
    "diffusers_fbc": (run_diffusers_fbc, ("diffusers_fbc", "diffusers_fbc_skip")),
    "ab_para_inductor": (run_ab_para_inductor, ("ab_inductor", "ab_para")),
}


def runners_for(only: str | None) -> list[str]:
    """Runner names for ``--only`` (row names or runner names), in the canonical order."""
    if not only:
        return list(RUNNERS)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    chosen = [name for name, (_, rows) in RUNNERS.items() if name in wanted or wanted & set(rows)]
    known = set(RUNNERS) | {row for _, rows in RUNNERS.values() for row in rows}
    if wanted - known:
        raise SystemExit(f"--only: unknown {sorted(wanted - known)}; choose from {sorted(known)}")
    return chosen


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:3000]


# --- derived numbers and the report -----------------------------------------------------------


def derive(data: dict) -> None:
    """MFU and the target ratios from whatever has been measured so far."""
    ms = data.setdefault("ms_per_step", {})
    for row in ROWS:
        ms.setdefault(row, None)
    compile_s = data.setdefault("compile_s", {})
    for row in ("inductor", "para"):
        compile_s.setdefault(row, None)
    flops = data.get("flops_per_step")
    data["peak_flops"] = harness.H100_BF16_DENSE_FLOPS
    data["mfu"] = {
        row: (round(flops / (ms[row] / 1e3) / harness.H100_BF16_DENSE_FLOPS, 4) if flops and ms.get(row) else None)
        for row in MFU_ROWS
    }

    def ratio(a, b):
        return round(a / b, 4) if a and b else None

    def best(*rows):  # para's fastest way to run a configuration, CUDA graphs or not
        measured = [ms[row] for row in rows if ms.get(row)]
        return min(measured) if measured else None

    para_bf16, para_fp8 = best("para", "para_cudagraphs"), best("para_fp8", "para_fp8_cudagraphs")
    piped = data.get("pipelined_ms_per_step", {})

    checks = [
        ("para / inductor ms", ratio(ms["para"], ms["inductor"]), "<=", 1.00),
        ("para / inductor ms, interleaved in one process", ratio(ms.get("ab_para"), ms.get("ab_inductor")), "<=", 1.00),
        ("cache skip / compute ms", ratio(ms["para_cache_skip"], ms["para_cache_compute"]), "<=", 0.10),
        ("para / inductor compile s", ratio(compile_s.get("para"), compile_s.get("inductor")), "<=", 1.5),
        ("para_fp8 (best) / inductor_fp8 ms", ratio(para_fp8, ms["inductor_fp8"]), "<=", 0.90),
        ("inductor bf16 / fp8 ms (speed-up)", ratio(ms["inductor"], ms["inductor_fp8"]), ">=", 1.4),
        ("para bf16 / fp8 ms, each its best (speed-up)", ratio(para_bf16, para_fp8), ">=", 1.4),
        ("the same, steps enqueued back to back", ratio(piped.get("para_cudagraphs"), piped.get("para_fp8_cudagraphs")),
         ">=", 1.4),
        ("para_cache_compute / paraattention ms", ratio(ms["para_cache_compute"], ms["paraattention"]), "<=", 1.00),
        ("para_cache_compute / diffusers_fbc ms", ratio(ms["para_cache_compute"], ms["diffusers_fbc"]), "<=", 1.00),
    ]
    data["targets"] = [
        {"what": what, "value": value, "target": f"{op} {bound}",
         "met": None if value is None else (value <= bound if op == "<=" else value >= bound)}
        for what, value, op, bound in checks
    ]


def markdown(data: dict) -> str:
    ms, compile_s, mfu = data["ms_per_step"], data.get("compile_s", {}), data.get("mfu", {})
    errors, details = data.get("errors", {}), data.get("details", {})
    extra = sorted(set(ms) - set(ROWS))
    lines = [
        "# FLUX.1-dev-shaped transformer, one GPU",
        "",
        f"GPU: {data.get('gpu')}; torch {data.get('torch')}, CUDA {data.get('cuda')}, diffusers {data.get('diffusers')}, "
        f"torchao {data.get('torchao')}, para-attn {data.get('para_attn')}.",
        f"Model: {data.get('model')}; {data.get('workload')}. Random bf16 weights. Median of "
        f"{data.get('iters')} steps (CUDA events) after {data.get('warmup')} warm-up steps, each waited for; then the "
        "same steps enqueued back to back, as a sampling loop runs them, their median; compile = wall "
        "time of the first call (cold Inductor cache per process).",
        "",
        "| configuration | ms / step | steps back to back (ms / step) | first call (s) | MFU | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in (*ROWS, *extra):
        note = errors.get(row, "")
        if not note:
            info = details.get(row, {})
            note = ", ".join(f"{key} {info[key]}" for key in ("granularity", "ms_by_granularity", "threshold",
                                                                "decisions", "cache_stats") if key in info)
        lines.append(
            f"| {row} | {_fmt(ms.get(row), '.1f')} | {_fmt(data.get('pipelined_ms_per_step', {}).get(row), '.1f')} | "
            f"{_fmt(compile_s.get(row), '.1f')} | {_fmt(mfu.get(row), '.1%')} | "
            f"{note.replace('|', '/').splitlines()[0][:300] if note else ''} |"
        )
    lines += ["", f"FLOPs per step (FlopCounterMode on eager): {_fmt(data.get('flops_per_step'), '.4g')}; MFU against "
              f"{data.get('peak_flops', 0) / 1e12:.0f} TFLOP/s (dense bf16).", "", "| target | value | wanted | met |",
              "| --- | ---: | --- | --- |"]
    for check in data.get("targets", []):
        lines.append(f"| {check['what']} | {_fmt(check['value'], '.3f')} | {check['target']} | {check['met']} |")
    if data.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in data["notes"]]
    lines += ["", "Commands (each merged into the same result file):", ""]
    lines += [f"    {command}" for command in data.get("commands", [])]
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def save(b: Bench) -> None:
    data = b.results.save(derive)
    with open(os.path.splitext(b.args.out)[0] + ".md", "w") as f:
        f.write(markdown(data))


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2+2 blocks, 128 px, 16 text tokens: checks the script")
    parser.add_argument("--only", help="comma-separated rows or runners: " + ", ".join(RUNNERS))
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--resolution", type=int, default=None, help="pixels per side (default 1024; 128 tiny)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default 512; 16 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first call (default 3; 1 tiny)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 10; 2 tiny)")
    parser.add_argument("--input-sets", type=int, default=4, help="distinct per-step inputs to cycle through")
    parser.add_argument("--fp8-granularity", choices=("row", "tensor", "both"), default="both")
    parser.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor",
                        help="aot_eager checks the script's plumbing quickly (timings then mean nothing)")
    parser.add_argument("--profile", action="store_true", help="add a kernel profile of compiled rows (CUDA)")
    parser.add_argument("--host-profile", action="store_true",
                        help="with --profile: also the host's time per call with the GPU kept busy, and its "
                             "Python functions by self time")
    parser.add_argument("--inductor-config", action="append", default=[], metavar="NAME=VALUE",
                        help="an Inductor config value for every compile of the run (repeatable), e.g. cpp_wrapper=True")
    parser.add_argument("--dynamo-config", action="append", default=[], metavar="NAME=VALUE",
                        help="a Dynamo config value for every compile of the run (repeatable), "
                             "e.g. use_recursive_dict_tags_for_guards=True")
    parser.add_argument("--para-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a para_fx.backend keyword for every para row (repeatable), e.g. fuse_projections=True")
    parser.add_argument("--skip-module-guards", action="store_true",
                        help="para and para_cache compiled without Dynamo's guards on modules and parameters")
    parser.add_argument("--ab-rounds", type=int, default=6, help="alternating rounds of ab_para_inductor")
    parser.add_argument("--out", default=None, help="result JSON (the .md goes beside it)")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    parser.add_argument("--report", action="store_true", help="only rewrite the summary and the .md from the JSON")
    parser.add_argument("--fresh", action="store_true", help="start a new result file instead of merging")
    args = parser.parse_args(argv)
    defaults = dict(resolution=(128, 1024), text_len=(16, 512), warmup=(1, 3), iters=(2, 10))
    for name, (tiny_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny_value if args.tiny else full_value)
    args.para_options = {name: ast.literal_eval(value) for name, value in (o.split("=", 1) for o in args.para_option)}
    if args.out is None:
        here = os.path.dirname(os.path.abspath(__file__))
        args.out = os.path.join(here, "results", "flux_1gpu_tiny.json" if args.tiny else "flux_1gpu.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        results = harness.ResultFile(args.out, fresh=False)
        for note in args.note:
            results.append("notes", note)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(results.save(derive)))
        return 0
    chosen = runners_for(args.only)
    harness.fresh_inductor_cache()
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    b = Bench(args)
    for key, value in harness.environment(b.device).items():
        b.results.put(None, key, value)
    config = harness.FLUX_TINY if args.tiny else harness.FLUX_DEV
    b.results.put(None, "model", f"FluxTransformer2DModel {config['num_layers']} double + "
                  f"{config['num_single_layers']} single blocks, {config['num_attention_heads']} heads x "
                  f"{config['attention_head_dim']}")
    b.results.put(None, "workload", f"{args.resolution}x{args.resolution} px = {(args.resolution // 16) ** 2} "
                  f"image + {args.text_len} text tokens, batch 1")
    for key, value in dict(warmup=args.warmup, iters=args.iters, compiler=args.compiler).items():
        b.results.put(None, key, value)
    import torch._inductor.config

    if args.skip_module_guards:
        b.results.put(None, "guard_filter", "skip_guard_on_all_nn_modules_unsafe (para rows)")
    for name, value in args.para_options.items():
        b.results.put("para_options", name, value)
    for key, config, settings in (("inductor_config", torch._inductor.config, args.inductor_config),
                                  ("dynamo_config", torch._dynamo.config, args.dynamo_config)):
        for setting in settings:
            name, value = setting.split("=", 1)
            setattr(config, name, ast.literal_eval(value))
            b.results.put(key, name, value)
    command = "python bench/flux_1gpu.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    b.results.append("commands", command.strip())
    for note in args.note:
        b.results.append("notes", note)
    failed = []
    with torch.no_grad():
        for name in chosen:
            run, rows = RUNNERS[name]
            print(f"[flux_1gpu] running {name}", flush=True)
            b.recorded = set()
            try:
                run(b)
            except Exception as error:  # record and go on: one configuration must not lose the run
                traceback.print_exc()
                failed.append(name)
                for row in rows:
                    if row not in b.recorded:
                        b.results.put("errors", row, _error_text(error))
            finally:
                harness.free_memory()
            save(b)
    print(markdown(b.results.data))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
