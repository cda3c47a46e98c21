"""The shard pass on tiny diffusers transformers and plain DiTs.

Structure (one graph, every attention split, no fallback or gather inside the blocks) is read
in-process from ``explain`` on a simulated mesh, as rank 0: it holds the largest chunks, and a rank
whose graph differed in a gather or a fallback would send collectives the others do not, which
the numeric tier would see fail. Outputs are compared with single-process eager on every real
gloo rank, every model and mesh in the one spawn per world size of tests/ranks.py.
"""

import pytest
import torch

import para_fx
from para_fx.adapters.traceable import make_traceable
from para_fx.testing import dits, zoo
from para_fx.testing.dits import first_tensor
import ranks

FACTORIES = {**zoo.FACTORIES, **dits.FACTORIES}
ALL = ["flux", "hunyuan_video", "mochi", "cogvideox", "wan", "sd3", "patch_dit", "joint_dit"]

# (batch, ring, ulysses) -> the models run on that mesh
MESHES = {
    (1, 1, 2): ALL,
    (1, 2, 1): ["flux", "wan", "joint_dit", "patch_dit", "fp8_patch_dit"],
    (2, 1, 1): ["patch_dit"],
    (1, 2, 2): ["flux", "hunyuan_video", "cogvideox", "sd3", "joint_dit"],
    (1, 4, 1): ["wan", "patch_dit"],
    (2, 1, 2): ["patch_dit"],
}
CASES = [(mesh_shape, name) for mesh_shape, names in MESHES.items() for name in names]


def world_of(mesh_shape):
    return mesh_shape[0] * mesh_shape[1] * mesh_shape[2]


def model_and_inputs(name):
    torch.manual_seed(0)
    model, kwargs = FACTORIES[name]()
    make_traceable(model)  # Mochi's per-sample attention loop as one masked SDPA: one graph
    return model, kwargs


def case_id(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# --- structure, in-process ------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape, name", CASES, ids=case_id)
def test_structure_on_a_simulated_mesh(mesh_shape, name):
    model, kwargs = model_and_inputs(name)
    batch, ring, ulysses = mesh_shape
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=world_of(mesh_shape), batch=batch, ring=ring, ulysses=ulysses)
    torch._dynamo.reset()
    where = f"{name} mesh {mesh_shape}"
    assert report.graph_count == 1, f"{where}: {report.graph_count} graphs (code between graphs runs unsharded)"
    inside = [(f.module, f.op, f.reason, f.source) for f in report.fallbacks if "blocks." in f.module]
    assert not inside, f"{where}: fallback inside the transformer blocks: {inside}"
    # all-to-alls are emitted only by attention and all-reduces only for reductions, so
    # a gather inside the blocks would be a fallback or a reshard.
    gathers = [c.module for c in report.collectives if c.kind.startswith("all_gather") and "blocks." in c.module]
    assert not gathers, f"{where}: all-gathers inside the transformer blocks: {gathers}"
    seq = ring * ulysses
    if seq > 1:
        sites = [(s.module, s.strategy, s.local_query_len, s.global_query_len) for s in report.attention_sites]
        parallel = [s for s in sites if s[1] in ("ulysses", "ring", "hybrid", "local")]
        assert parallel, f"{where}: no attention site was sharded: {sites}"
        for module, strategy, local, total in parallel:
            assert local <= total // seq + 2, f"{where}: {module} keeps {local} of {total} query tokens"


def test_batch_parallel_only_gathers_outputs():
    model, kwargs = dits.patch_dit()
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2, batch=2)
    torch._dynamo.reset()
    assert [c.kind for c in report.collectives] == ["all_gather_into_tensor"], str(report)


# --- outputs, on real ranks -----------------------------------------------------------------------


def compiled_error(mesh_shape, name):
    """On one rank: max abs error of the model compiled with the para backend against eager."""
    mesh = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
    model, kwargs = model_and_inputs(name)
    with torch.no_grad():
        expected = first_tensor(model(**kwargs))
        compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="aot_eager"))
        return (first_tensor(compiled(**kwargs)) - expected).abs().max().item()


# FLUX on Ulysses 2 against eager on 2 ranks, at the same tolerance, is what examples/demo.py
# checks through aot_eager (tests/test_quiet.py) and examples/usage.py through Inductor
# (tests/test_readme.py): not run a third time here.
NUMERIC_CASES = [case for case in CASES if case != ((1, 1, 2), "flux")]
for _mesh_shape, _name in NUMERIC_CASES:
    ranks.add(world_of(_mesh_shape), f"shard {case_id(_mesh_shape)} {_name}", compiled_error, _mesh_shape, _name)


@pytest.mark.ranks
@pytest.mark.parametrize("mesh_shape, name", NUMERIC_CASES, ids=case_id)
def test_outputs_match_single_process(mesh_shape, name):
    errors = ranks.result(world_of(mesh_shape), f"shard {case_id(mesh_shape)} {name}")
    assert max(errors) <= 1e-4, f"{name} mesh {mesh_shape}: max abs error per rank {errors}"


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


ranks.add(2, "shard new resolutions", new_resolutions)


@pytest.mark.ranks
def test_new_resolution_on_two_ranks():
    for errors in ranks.result(2, "shard new resolutions"):
        assert len(errors) == 4 and max(errors) <= 1e-4, errors
