"""The shard pass on tiny diffusers transformers and plain DiTs, against single-process eager."""

import pytest
import torch
import torch.distributed as dist

import para_fx
from para_fx.adapters.traceable import make_traceable
from para_fx.testing import dits, zoo
from para_fx.testing.dits import first_tensor
from para_fx.testing.launch import run_ranks

FACTORIES = {**zoo.FACTORIES, **dits.FACTORIES}


def shard_models(mesh_shape, names, compiler="aot_eager", factory_kwargs=None):
    """On one rank: each model compiled with the para backend vs. eager, and what explain saw."""
    torch.manual_seed(0)
    mesh = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
    results = {}
    for name in names:
        model, kwargs = FACTORIES[name](**(factory_kwargs or {}).get(name, {}))
        make_traceable(model)  # Mochi's per-sample attention loop as one masked SDPA: one graph
        with torch.no_grad():
            expected = first_tensor(model(**kwargs))
            compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler=compiler))
            error = (first_tensor(compiled(**kwargs)) - expected).abs().max().item()
        torch._dynamo.reset()
        report = para_fx.explain(model, kwargs=kwargs, mesh=mesh)
        results[name] = dict(
            error=error,
            sites=[(s.module, s.strategy, s.local_query_len, s.global_query_len) for s in report.attention_sites],
            fallbacks=[(f.module, f.op, f.reason, f.source) for f in report.fallbacks],
            collectives=[(c.kind, c.module) for c in report.collectives],
            graphs=report.graph_count,
        )
        torch._dynamo.reset()
    return results


def check(per_rank, mesh_shape, exact_graph=True):
    seq = mesh_shape[1] * mesh_shape[2]
    for rank, results in enumerate(per_rank):
        for name, r in results.items():
            where = f"{name} mesh {mesh_shape} rank {rank}"
            assert r["error"] <= 1e-4, f"{where}: max abs error {r['error']}"
            assert r["graphs"] == 1, f"{where}: {r['graphs']} graphs (code between graphs runs unsharded)"
            inside = [f for f in r["fallbacks"] if "blocks." in f[0]]
            assert not inside, f"{where}: fallback inside the transformer blocks: {inside}"
            # all-to-alls are emitted only by attention and all-reduces only for reductions, so
            # a gather inside the blocks would be a fallback or a reshard.
            gathers = [m for kind, m in r["collectives"] if kind.startswith("all_gather") and "blocks." in m]
            assert not gathers, f"{where}: all-gathers inside the transformer blocks: {gathers}"
            if seq > 1:
                parallel = [s for s in r["sites"] if s[1] in ("ulysses", "ring", "hybrid", "local")]
                assert parallel, f"{where}: no attention site was sharded: {r['sites']}"
                for module, strategy, local, total in parallel:
                    assert local <= total // seq + 2, f"{where}: {module} keeps {local} of {total} query tokens"


ALL = ["flux", "hunyuan_video", "mochi", "cogvideox", "wan", "sd3", "patch_dit", "joint_dit"]


@pytest.mark.parametrize(
    "world, mesh_shape, names",
    [
        (2, (1, 1, 2), ALL),
        (2, (1, 2, 1), ["flux", "wan", "joint_dit", "patch_dit", "fp8_patch_dit"]),
        (2, (2, 1, 1), ["patch_dit"]),
        (4, (1, 2, 2), ["flux", "hunyuan_video", "cogvideox", "sd3", "joint_dit"]),
        (4, (1, 4, 1), ["wan", "patch_dit"]),
        (4, (2, 1, 2), ["patch_dit"]),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_models_match_single_process(world, mesh_shape, names):
    check(run_ranks(shard_models, world, mesh_shape, names, timeout=900), mesh_shape)


def test_flux_through_inductor():
    check(run_ranks(shard_models, 2, (1, 1, 2), ["flux"], "inductor", timeout=900), (1, 1, 2))


def new_resolutions():
    mesh = para_fx.init_mesh(ring=2, ulysses=1)
    model, _ = dits.joint_dit()
    compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="aot_eager"))
    errors = []
    with torch.no_grad():
        for height in (14, 18, 10, 14):
            _, kwargs = dits.joint_dit(height=height)
            errors.append((compiled(**kwargs) - model(**kwargs)).abs().max().item())
    return errors


def test_new_resolution_on_two_ranks():
    for errors in run_ranks(new_resolutions, 2):
        assert max(errors) <= 1e-4, errors


def batch_sharded_sites():
    mesh = para_fx.init_mesh(batch=2)
    model, kwargs = dits.patch_dit()
    report = para_fx.explain(model, kwargs=kwargs, mesh=mesh)
    return [c.kind for c in report.collectives], str(report)


def test_batch_parallel_only_gathers_outputs():
    kinds, text = run_ranks(batch_sharded_sites, 2)[0]
    assert kinds == ["all_gather_into_tensor"], text
