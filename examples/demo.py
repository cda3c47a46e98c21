"""para-fx in one minute: a tiny FLUX transformer, context-parallel on 2 CPU processes.

    python examples/demo.py [--world-size 2] [--ring 1]

Each rank compiles the model with the para backend, runs it on the same inputs, and checks the
full output against single-process eager. Rank 0 prints what was sharded.
"""

import argparse

import torch
import torch.distributed as dist

import para_fx
from para_fx.testing import zoo
from para_fx.testing.launch import run_ranks


def demo(ring: int) -> float:
    model, kwargs = zoo.flux()
    mesh = para_fx.init_mesh(ring=ring)
    with torch.no_grad():
        expected = model(**kwargs)[0]
        compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="aot_eager"))
        out = compiled(**kwargs)[0]
    report = para_fx.explain(model, kwargs=kwargs, mesh=mesh)
    if dist.get_rank() == 0:
        print(report)
    return (out - expected).abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--ring", type=int, default=1, help="ring degree; the rest of the world is Ulysses")
    args = parser.parse_args()
    errors = run_ranks(demo, args.world_size, args.ring)
    worst = max(errors)
    print(f"max abs error vs single-process eager, per rank: {errors}")
    print("MATCH" if worst <= 1e-4 else "MISMATCH")
    raise SystemExit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
