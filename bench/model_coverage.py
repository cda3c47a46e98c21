"""Which diffusers transformers para splits: every model class of diffusers' own transformer tests,
with their tiny configurations and dummy inputs, through ``para_fx.explain`` on a simulated mesh.

    git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers   # for its tests/
    pip install accelerate parameterized                                          # what those tests import
    python bench/model_coverage.py /tmp/diffusers [--world 2] [--batches 1,2] [--only flux,wan]
    python bench/model_coverage.py /tmp/diffusers --device cuda --dtype bfloat16 --out OUT.json   # the GPU's graph
    python bench/model_coverage.py /tmp/diffusers --numeric [--worlds 2,4]                     # outputs on gloo ranks

Each model is first made traceable as ``parallelize_pipe`` does it. Per model and batch size it records the attention sites by strategy (ulysses / ring / hybrid split
the tokens; local attends replicated keys, such as text, without communication; replicated and batch
do not split the tokens), the fallbacks inside the transformer blocks (the first reason, with its
source line), the number of graphs, or the error. This is structure, read from one simulated rank.
Results: ``bench/results/model_coverage.json``.

``--numeric`` checks the outputs instead, on real ranks: per world size one launch of that many gloo
processes on 127.0.0.1 (``para_fx.runtime.runner.Runner``: the imports are paid once, a failure
on one rank or a hang is noticed and the ranks respawned) runs every model and batch size on the
default mesh of that many ranks (all Ulysses). Each rank compares the para backend's output
(``compiler="aot_eager"``, fp32) with the same model's single-process eager output:
max|out - ref| / max|ref| over the output tensors, at most ``TOLERANCE``. Results:
``bench/results/model_coverage_numeric.json``. ``--table`` prints the README's table from both.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import inspect
import json
import os
import re
import shlex
import sys
import time
import traceback

import torch

import para_fx
from para_fx.adapters.traceable import make_traceable
from para_fx.core.backend import recording
from para_fx.core.mesh import mesh_degrees
from para_fx.runtime.runner import RankDied, RankFailed, Runner

# strategies of a site whose queries are split over the ranks ("local": keys and values whole on
# every rank, such as the text of a cross-attention, next to linear self-attention in Sana)
SPLIT = ("ulysses", "ring", "hybrid", "local")
HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-4  # relative to the output's largest magnitude: fp32 arithmetic in another order
CASE_TIMEOUT = 900  # s one model at one batch size may take on every rank before the ranks are respawned


def test_modules(diffusers_root: str) -> list[str]:
    """The names of the checkout's transformer test modules: the numeric mode's parent lists the
    models without importing them (only its ranks do)."""
    folder = os.path.join(diffusers_root, "tests", "models", "transformers")
    return [f[: -len(".py")] for f in sorted(os.listdir(folder)) if f.startswith("test_models") and f.endswith(".py")]


def tester_configs(diffusers_root: str) -> dict[str, object]:
    """Test module name -> an instance of its tester config (a class with ``model_class``,
    ``get_init_dict`` and ``get_dummy_inputs``), from the checkout's tests/models/transformers."""
    sys.path.insert(0, diffusers_root)
    configs = {}
    for name in test_modules(diffusers_root):
        try:
            module = importlib.import_module(f"tests.models.transformers.{name}")
        except Exception as error:  # a test module this environment cannot import
            configs[name] = error
            continue
        for cls in vars(module).values():
            if (inspect.isclass(cls) and cls.__module__ == module.__name__ and cls.__name__.endswith("Config")
                    and all(hasattr(cls, a) for a in ("model_class", "get_init_dict", "get_dummy_inputs"))):
                configs[name] = cls()
                break
    return configs


class InputsNotRunnable(Exception):
    """The test's dummy inputs cannot run at this batch size (built at one batch size only, or
    rejected by the model itself): not a para result."""


def inputs_for(config, batch: int) -> dict:
    if "batch_size" not in inspect.signature(config.get_dummy_inputs).parameters:
        if batch != 1:
            raise InputsNotRunnable("the test's dummy inputs have a fixed batch size")
        return config.get_dummy_inputs()
    return config.get_dummy_inputs(batch_size=batch)


def examine(config, batch: int, world: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One model at one batch size: what explain reports on rank 0 of the simulated mesh.

    On CUDA the captured graph is not the CPU's (fused RMSNorm, the attention kernels SDPA picks
    for half precision), so ``--device cuda --dtype bfloat16`` checks what GPUs will run.
    """
    model, patched, kwargs = build(config, batch, device, dtype)
    torch._dynamo.reset()
    try:
        report = para_fx.explain(model, kwargs=kwargs, world_size=world)
    except Exception:
        try:  # inputs the model itself rejects are the test's, not para's
            with torch.no_grad():
                model(**kwargs)
        except Exception as eager_error:
            raise InputsNotRunnable(f"the model fails on these inputs without para too: {type(eager_error).__name__}") from None
        raise
    in_blocks = [f for f in report.fallbacks if report.in_blocks(f.module)]
    return {
        "class": type(model).__name__,
        "made_traceable": len(patched),
        "graphs": report.graph_count,
        "sites": dict(collections.Counter(site.strategy for site in report.attention_sites)),
        "fallbacks_in_blocks": len(in_blocks),
        "first_fallback": f"{in_blocks[0].op}: {in_blocks[0].reason} ({_short(in_blocks[0].source)})" if in_blocks else "",
    }


def build(config, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, list, dict]:
    """The test's model, seeded (every rank of the numeric mode builds the same weights and inputs),
    made traceable as ``parallelize_pipe`` makes it (known graph breaks removed), with its dummy inputs."""
    torch.manual_seed(0)
    model = config.model_class(**config.get_init_dict()).eval().to(device, dtype)
    patched = make_traceable(model)
    kwargs = {k: _on(v, device, dtype) for k, v in inputs_for(config, batch).items()}
    return model, patched, kwargs


def _on(value, device: torch.device, dtype: torch.dtype):
    """A dummy input on ``device``, floating-point tensors in ``dtype``."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def _short(source: str) -> str:
    """A source line from site-packages as ``diffusers/...py:N  code``."""
    source = " ".join(source.split())
    return source[source.find("diffusers/"):] if "diffusers/" in source else source


def _why(row: dict) -> str:
    if "not_run" in row:
        return row["not_run"]
    if "error" in row:
        return row["error"]
    if row["first_fallback"]:
        return row["first_fallback"]
    if row["graphs"] > 1:
        return f"{row['graphs']} graphs (graph breaks)"
    sites = ", ".join(f"{n} {s}" for s, n in sorted(row["sites"].items()))
    return f"attention sites: {sites}" if sites else "no attention site"


def verdict(row: dict) -> str:
    """What a user gets: split (the tokens split at the attention sites, no fallback in the blocks),
    partly split, or not split."""
    if "not_run" in row:
        return "-"
    if "error" in row:
        return "error"
    split = sum(row["sites"].get(s, 0) for s in SPLIT)
    if split and not row["fallbacks_in_blocks"] and row["graphs"] == 1:
        return "split"
    return "partly split" if split else "not split"


# --- numeric: outputs on gloo ranks against one process ---------------------------------------------


class CaseFailed(Exception):
    """A model raised under the para backend on a rank; the message is the backend's own error
    (not Dynamo's wrapper), which the parent reads back from the rank's traceback."""


def rank_setup(diffusers_root: str, rank: int, world: int) -> dict:
    """A rank's state for the whole launch: the tester configs (imported once) and the default mesh."""
    torch.set_num_threads(1)  # the ranks share the cores
    return {"configs": tester_configs(diffusers_root), "mesh": para_fx.init_mesh()}


def rank_case(state: dict, name: str, batch: int) -> dict:
    """On every rank: one model at one batch size, compiled with the para backend, against its
    eager output in this same process (no group needed for that). Inputs the model rejects without
    para are reported as not run, on every rank alike; a para failure raises ``CaseFailed``, so the
    runner sees it on every rank that fails and frees the ranks left waiting in a collective."""
    config = state["configs"][name]
    if isinstance(config, Exception):
        return {"error": f"test module not importable: {type(config).__name__}: {config}"[:300]}
    torch._dynamo.reset()
    try:
        model, _, kwargs = build(config, batch, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            expected = model(**kwargs)
    except InputsNotRunnable as reason:
        return {"class": config.model_class.__name__, "not_run": str(reason)}
    except Exception as eager_error:
        return {"class": config.model_class.__name__,
                "not_run": f"the model fails on these inputs without para too: {type(eager_error).__name__}"}
    compiled = torch.compile(model, backend=para_fx.backend(mesh=state["mesh"], compiler="aot_eager"))
    try:
        with torch.no_grad(), recording() as report:
            out = compiled(**kwargs)
    except Exception as error:
        cause = getattr(error, "inner_exception", None) or error
        traceback.print_exception(cause, limit=-8)  # where the backend raised, for the log
        raise CaseFailed(" ".join(f"{type(cause).__name__}: {cause}".split())[:300]) from None
    finally:
        torch._dynamo.reset()
    return {"class": type(model).__name__, "rel_err": relative_error(out, expected), "graphs": report.graph_count,
            "sites": dict(collections.Counter(site.strategy for site in report.attention_sites))}


def _tensors(value) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, a tuple, or diffusers' output dict)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _tensors(v)] if isinstance(value, (list, tuple)) else []


def relative_error(out, expected) -> float:
    """max|out - expected| / max|expected| over all output tensors."""
    outs, refs = _tensors(out), _tensors(expected)
    if [t.shape for t in outs] != [t.shape for t in refs]:
        raise CaseFailed(f"output shapes {[tuple(t.shape) for t in outs]}, eager {[tuple(t.shape) for t in refs]}")
    error = max((o - r).abs().max().item() for o, r in zip(outs, refs))
    scale = max(r.abs().max().item() for r in refs)
    return error / scale if scale else error


def _failure(error: RankFailed) -> str:
    """The backend's error from a rank's traceback (the ``CaseFailed`` line), else its last line."""
    text = str(error)
    marker = "CaseFailed: "
    if marker in text:
        return text[text.rindex(marker) + len(marker):].split("\n")[0]
    return [line for line in text.splitlines() if line.strip()][-1][:300]


def run_numeric(diffusers_root: str, names: list[str], world: int, batches: list[int], record) -> float:
    """One launch of ``world`` gloo ranks runs every model at every batch size; ``record(world, name,
    batch, row)`` takes each result as it comes. Returns the launch's wall seconds."""
    started = time.perf_counter()
    runner = Runner(functools.partial(rank_setup, diffusers_root), rank_case, world, backend="gloo",
                    timeout=CASE_TIMEOUT)
    try:
        for name in names:
            for batch in batches:
                case_started = time.perf_counter()
                try:
                    rows = runner.request((name, batch), all_ranks=True)
                    row = dict(rows[0])
                    if "rel_err" in row:  # the worst rank; the structure is rank 0's
                        row["rel_err"] = max(r["rel_err"] for r in rows)
                        row["pass"] = row["rel_err"] <= TOLERANCE
                except RankFailed as error:
                    row = {"error": _failure(error)}
                    runner.restart()  # a failed case may leave collectives unmatched: the next starts clean
                except (TimeoutError, RankDied) as error:
                    row = {"error": f"{type(error).__name__}: {error}"[:300]}
                    runner.restart()
                row["seconds"] = round(time.perf_counter() - case_started, 1)
                record(world, name, batch, row)
    finally:
        runner.close()
    return time.perf_counter() - started


def numeric_verdict(row: dict) -> str:
    """pass or fail (against ``TOLERANCE``), error (para raised, or the ranks hung or died), or - (the
    test's inputs do not run at this batch size: not para's result)."""
    if "not_run" in row:
        return "-"
    if "error" in row:
        return "error"
    return "pass" if row["pass"] else "fail"


def _sci(x: float) -> str:
    """An error to one digit, as "3e-7" (0 when the outputs are equal)."""
    return "0" if x == 0 else f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def numeric_summary(per_batch: dict) -> str:
    """The README's cell for one model: the worst error where every case that runs passes, else
    which cases fail or raise."""
    rows = {(b, w): row for b, per_world in per_batch.items() for w, row in per_world.items()}
    ran = {k: r for k, r in rows.items() if numeric_verdict(r) != "-"}
    if not ran:
        return "-"
    worlds = ", ".join(sorted({w for _, w in ran}, key=int))
    bad = {k: r for k, r in ran.items() if numeric_verdict(r) != "pass"}
    if not bad:
        return f"{worlds} ranks: max rel err {_sci(max(r['rel_err'] for r in ran.values()))}"
    parts = []
    for (b, w), r in sorted(bad.items()):
        what = f"rel err {_sci(r['rel_err'])}" if "rel_err" in r else r["error"][:80]
        parts.append(f"batch {b} on {w} ranks: {what}")
    return "; ".join(parts)


def table(results: dict, numeric: dict | None = None) -> str:
    lines = ["| model class | batch 1 | batch 2 | what keeps it from splitting | outputs vs one process (fp32, batch 1 and 2) |",
             "| --- | --- | --- | --- | --- |"]
    numeric_models = numeric["models"] if numeric else {}
    for name, per_batch in sorted(results["models"].items(), key=lambda kv: kv[1].get("1", {}).get("class", kv[0])):
        rows = [per_batch.get(b, {"error": "not run"}) for b in ("1", "2")]
        cls = next((r["class"] for r in rows if "class" in r), name)
        why = next((_why(r) for r in rows if verdict(r) not in ("split", "-")), "")
        why = re.sub(r"[^\s(]*site-packages/", "", why)  # paths from the package, not from this machine
        why = re.sub(r"((?:diffusers|torch)/[\w/]+)\.py:(\d+)", lambda m: f"{m[1].replace('/', '.')} line {m[2]}", why)  # a module, not a repository path
        checked = numeric_summary(numeric_models[name]) if name in numeric_models else "not run"
        lines.append(f"| {cls} | {verdict(rows[0])} | {verdict(rows[1])} | {why[:160].replace('|', '/')} | {checked.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("diffusers_root", nargs="?", help="a diffusers checkout (its tests/ folder)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--only", default="", help="comma-separated substrings of test module names")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "model_coverage.json"))
    parser.add_argument("--device", default="cpu", help="where the models run (cuda: the graph GPUs capture)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--table", action="store_true", help="print the README table from --out and --numeric-out and stop")
    parser.add_argument("--numeric", action="store_true", help="compare outputs with one process on gloo ranks")
    parser.add_argument("--worlds", default="2,4", help="with --numeric: the numbers of ranks, one launch each")
    parser.add_argument("--numeric-out", default=os.path.join(HERE, "results", "model_coverage_numeric.json"))
    args = parser.parse_args()
    if args.table:
        with open(args.out) as f:
            structure = json.load(f)
        numeric = None
        if os.path.exists(args.numeric_out):
            with open(args.numeric_out) as f:
                numeric = json.load(f)
        print(table(structure, numeric))
        return 0
    if not args.diffusers_root:
        parser.error("give a diffusers checkout")
    if args.numeric:
        return numeric_main(args)
    import diffusers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = {"diffusers": diffusers.__version__, "torch": torch.__version__, "world": args.world,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
               "models": {}}
    only = [s for s in args.only.split(",") if s]
    if only and os.path.exists(args.out):  # a partial run updates the models it runs
        with open(args.out) as f:
            results["models"] = json.load(f)["models"]
    for name, config in tester_configs(args.diffusers_root).items():
        if only and not any(s in name for s in only):
            continue
        per_batch = results["models"][name] = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            if isinstance(config, Exception):
                per_batch[str(batch)] = {"error": f"test module not importable: {type(config).__name__}: {config}"[:300]}
                continue
            try:
                per_batch[str(batch)] = examine(config, batch, args.world, device, dtype)
            except InputsNotRunnable as reason:
                per_batch[str(batch)] = {"class": config.model_class.__name__, "not_run": str(reason)}
            except Exception as error:
                cause = getattr(error, "inner_exception", None) or error  # the backend's own error, not Dynamo's wrapper
                per_batch[str(batch)] = {"class": config.model_class.__name__, "error": f"{type(cause).__name__}: {cause}"[:300]}
                traceback.print_exc(limit=2)
            print(f"[model_coverage] {name} batch {batch}: {verdict(per_batch[str(batch)])}", flush=True)
        with open(args.out, "w") as f:  # after every model: a cut-short run keeps what it found
            json.dump(results, f, indent=1, sort_keys=True)
    counts = collections.Counter(verdict(r) for per_batch in results["models"].values() for r in per_batch.values())
    print(f"[model_coverage] {dict(counts)}")
    return 0


def numeric_main(args) -> int:
    """The numeric mode: updates --numeric-out with the cases it runs (every model unless --only),
    writing it after every case, so a cut-short run keeps what it found."""
    import diffusers

    only = [s for s in args.only.split(",") if s]
    names = [n for n in test_modules(args.diffusers_root) if not only or any(s in n for s in only)]
    worlds, batches = [int(w) for w in args.worlds.split(",")], [int(b) for b in args.batches.split(",")]
    results = {"models": {}, "launch_seconds": {}, "partial_runs": []}
    if os.path.exists(args.numeric_out):
        with open(args.numeric_out) as f:
            results.update(json.load(f))
    command = shlex.join(["python", "bench/model_coverage.py", "DIFFUSERS_CHECKOUT", "--numeric", "--worlds", args.worlds,
                          "--batches", args.batches, *(["--only", args.only] if only else [])])
    results.update(diffusers=diffusers.__version__, torch=torch.__version__, dtype="float32", compiler="aot_eager",
                   tolerance=TOLERANCE, rel_err="max|out - eager| / max|eager| over the output tensors, worst rank")
    results["meshes"] = {**results.get("meshes", {}), **{
        str(w): "batch {} x ring {} x ulysses {}".format(*mesh_degrees(w)) for w in worlds}}
    if only:
        results["partial_runs"].append(command)
    else:
        results["command"] = command
        results["models"] = {n: results["models"].get(n, {}) for n in names}  # models diffusers dropped go

    def record(world: int, name: str, batch: int, row: dict) -> None:
        results["models"].setdefault(name, {}).setdefault(str(batch), {})[str(world)] = row
        detail = f" {row['rel_err']:.1e}" if "rel_err" in row else f" {row.get('error', row.get('not_run'))}"
        print(f"[model_coverage --numeric] {world} ranks, {name} batch {batch}: {numeric_verdict(row)}{detail} "
              f"({row['seconds']} s)", flush=True)
        with open(args.numeric_out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)

    for world in worlds:
        seconds = run_numeric(args.diffusers_root, names, world, batches, record)
        if not only:
            results["launch_seconds"][str(world)] = round(seconds)
        with open(args.numeric_out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    counts = collections.Counter((w, b, numeric_verdict(r)) for n in names for b, per_world in results["models"][n].items()
                                 for w, r in per_world.items())
    for (w, b, v), n in sorted(counts.items()):
        print(f"[model_coverage --numeric] {w} ranks, batch {b}: {n} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
