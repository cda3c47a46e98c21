"""Replicated vectors' matmuls split by columns: which ones, one all-gather, the same outputs on ranks."""

import re

import pytest
import torch

import para_fx
import ranks
from traced import each_backend
from para_fx.core.backend import recording
from para_fx.inspect.explain import simulated_mesh
from para_fx.passes import split_vector_matmuls as pass_module
from para_fx.testing import zoo

FLUX = dict(height=4, width=6, text_len=4, num_layers=1, num_single_layers=1)
GATHER = ".all_gather_into_tensor.default("


def _split_count(report) -> int:
    notes = [n for n in report.notes if n.startswith("split vector matmuls:")]
    return int(re.match(r"split vector matmuls: (\d+) ", notes[0]).group(1)) if notes else 0


def test_flux_modulations_split_into_one_all_gather_only_where_worth_it(monkeypatch):
    """The four backends compile the graph Dynamo traced once (tests/traced.py)."""
    model, kwargs = zoo.flux(**FLUX)
    with simulated_mesh(2, ulysses=2) as mesh:
        split = para_fx.backend(mesh=mesh, compiler="eager", split_vector_matmuls=True)

        def split_anyway(gm, example_inputs):
            with monkeypatch.context() as patched:
                patched.setattr(pass_module, "MIN_BYTES", 0)  # split them anyway
                return split(gm, example_inputs)

        backends = [
            para_fx.backend(mesh=mesh, compiler="eager"),
            split,  # tiny weights: not worth it
            para_fx.backend(mesh=mesh, compiler="eager", split_vector_matmuls=True, cache=para_fx.FirstBlockCache(0.1)),
            split_anyway,
        ]
        (default, _), (small, _), (cached, _), (report, _) = each_backend(model, kwargs, backends)
    for unsplit in (default, small):
        assert "split_vector_matmuls" not in unsplit.graphs and _split_count(unsplit) == 0
    assert any("not applied with the first block cache" in n for n in cached.notes)
    # two modulations in the double-stream block (image, text), one in the single-stream block,
    # one for the output norm; the embedders' linears they are computed from stay whole
    assert _split_count(report) == 2 + 1 + 1
    code = report.graphs["split_vector_matmuls"]
    # each split weight is sliced to this rank's half of its rows; one all-gather joins them all
    assert len(re.findall(r"aten\.slice\.Tensor\(\w+_weight, 0, 0, ", code)) == _split_count(report)
    assert code.count(GATHER) == default.graphs["shard_seq"].count(GATHER) + 1
    assert report.fallbacks == default.fallbacks == []


def split_errors(mesh_shape, model_name):
    """On every rank: the model compiled with the split (aot_eager) against one process's eager."""
    pass_module.MIN_BYTES = 0
    model, kwargs = zoo.FACTORIES[model_name](**(FLUX if model_name == "flux" else {}))
    with torch.no_grad():
        expected = model(**kwargs)[0]
        mesh = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
        torch._dynamo.reset()
        with recording() as report:
            backend = para_fx.backend(mesh=mesh, compiler="aot_eager", split_vector_matmuls=True)
            got = torch.compile(model, backend=backend)(**kwargs)[0]
    return float((got - expected).abs().max() / expected.abs().max()), _split_count(report)


# (batch, ring, ulysses)
CASES = [((1, 2, 1), "flux")]  # Ulysses: the structure test above
for _mesh_shape, _name in CASES:
    ranks.add(2, f"split vector matmuls {_name} {ranks.mesh_id(_mesh_shape)}", split_errors, _mesh_shape, _name)


@pytest.mark.ranks
@pytest.mark.parametrize("mesh_shape,model_name", CASES, ids=[f"{n}-{ranks.mesh_id(m)}" for m, n in CASES])
def test_same_outputs_on_two_ranks(mesh_shape, model_name):
    for error, split in ranks.result(2, f"split vector matmuls {model_name} {ranks.mesh_id(mesh_shape)}"):
        assert error < 1e-4
        assert split > 0
