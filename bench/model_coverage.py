"""Which diffusers transformers para splits: every model class of diffusers' own transformer tests,
with their tiny configurations and dummy inputs, through ``para_fx.explain`` on a simulated mesh.

    git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers   # for its tests/
    pip install accelerate parameterized                                          # what those tests import
    python bench/model_coverage.py /tmp/diffusers [--world 2] [--batches 1,2] [--only flux,wan]
    python bench/model_coverage.py /tmp/diffusers --device cuda --dtype bfloat16 --out OUT.json   # the GPU's graph

Each model is first made traceable as ``parallelize_pipe`` does it. Per model and batch size it records the attention sites by strategy (ulysses / ring / hybrid split
the tokens; local attends replicated keys, such as text, without communication; replicated and batch
do not split the tokens), the fallbacks inside the transformer blocks (the first reason, with its
source line), the number of graphs, or the error. This is structure, read from one simulated rank:
the numeric comparison against one process runs on real ranks in tests/ (``tests/test_shard.py``)
for the models there. Results: ``bench/results/model_coverage.json``; ``--table`` prints the
README's table from it.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import re
import sys
import traceback

import torch

import para_fx
from para_fx.adapters.traceable import make_traceable

# strategies of a site whose queries are split over the ranks ("local": keys and values whole on
# every rank, such as the text of a cross-attention, next to linear self-attention in Sana)
SPLIT = ("ulysses", "ring", "hybrid", "local")
HERE = os.path.dirname(os.path.abspath(__file__))


def tester_configs(diffusers_root: str) -> dict[str, object]:
    """Test module name -> an instance of its tester config (a class with ``model_class``,
    ``get_init_dict`` and ``get_dummy_inputs``), from the checkout's tests/models/transformers."""
    sys.path.insert(0, diffusers_root)
    folder = os.path.join(diffusers_root, "tests", "models", "transformers")
    configs = {}
    for file in sorted(os.listdir(folder)):
        if not (file.startswith("test_models") and file.endswith(".py")):
            continue
        name = file[: -len(".py")]
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
    torch.manual_seed(0)
    model = config.model_class(**config.get_init_dict()).eval().to(device, dtype)
    patched = make_traceable(model)  # what parallelize_pipe does first: known graph breaks removed
    kwargs = {k: _on(v, device, dtype) for k, v in inputs_for(config, batch).items()}
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


def table(results: dict) -> str:
    lines = ["| model class | batch 1 | batch 2 | what keeps it from splitting |", "| --- | --- | --- | --- |"]
    for name, per_batch in sorted(results["models"].items(), key=lambda kv: kv[1].get("1", {}).get("class", kv[0])):
        rows = [per_batch.get(b, {"error": "not run"}) for b in ("1", "2")]
        cls = next((r["class"] for r in rows if "class" in r), name)
        why = next((_why(r) for r in rows if verdict(r) not in ("split", "-")), "")
        why = re.sub(r"[^\s(]*site-packages/", "", why)  # paths from the package, not from this machine
        why = re.sub(r"((?:diffusers|torch)/[\w/]+)\.py:(\d+)", lambda m: f"{m[1].replace('/', '.')} line {m[2]}", why)  # a module, not a repository path
        lines.append(f"| {cls} | {verdict(rows[0])} | {verdict(rows[1])} | {why[:160].replace('|', '/')} |")
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
    parser.add_argument("--table", action="store_true", help="print the README table from --out and stop")
    args = parser.parse_args()
    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)))
        return 0
    if not args.diffusers_root:
        parser.error("give a diffusers checkout")
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


if __name__ == "__main__":
    sys.exit(main())
