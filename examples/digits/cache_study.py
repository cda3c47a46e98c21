"""First Block Cache quality on the trained digits DiT: steps skipped vs. PSNR against no cache.

    python -m examples.digits.cache_study [--samples 100] [--json out.json]

Each threshold samples the same noise and labels for 28 Euler steps, once per batch (the cache
decides for the whole batch), and is compared with the uncached compiled model. Prints the
markdown table the README shows.
"""

from __future__ import annotations

import argparse
import json

import torch

import para_fx

from . import model as digits

THRESHOLDS = (0.03, 0.05, 0.08, 0.12, 0.2)
STEPS = 28


def run(threshold: float | None, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, para_fx.CacheStats | None]:
    """Samples with the cache at ``threshold`` (None: no cache) and the cache's record."""
    torch._dynamo.reset()
    cache = None if threshold is None else para_fx.FirstBlockCache(threshold=threshold)
    model = torch.compile(digits.load(), backend=para_fx.backend(cache=cache, compiler="eager"))
    if cache is None:
        return digits.sample(model, labels, steps=STEPS, seed=seed), None
    with para_fx.cache_session(model):
        images = digits.sample(model, labels, steps=STEPS, seed=seed)
    return images, para_fx.cache_stats(model)


def study(samples: int = 100, seed: int = 0, thresholds=THRESHOLDS) -> list[dict]:
    labels = torch.arange(samples) % 10
    reference, _ = run(None, labels, seed)
    rows = []
    for threshold in thresholds:
        images, stats = run(threshold, labels, seed)
        rows.append(
            dict(
                threshold=threshold,
                skipped=stats.skipped,
                steps=stats.steps,
                skipped_fraction=stats.skipped / stats.steps,
                psnr_db=digits.psnr(images, reference),
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| threshold | steps skipped (of 28) | skipped | PSNR vs. no cache |", "|---|---|---|---|"]
    for r in rows:
        quality = "identical" if r["skipped"] == 0 else f"{r['psnr_db']:.1f} dB"
        lines.append(f"| {r['threshold']} | {r['skipped']} | {r['skipped_fraction']:.0%} | {quality} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = study(args.samples, args.seed)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
