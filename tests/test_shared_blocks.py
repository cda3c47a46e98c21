"""Shared blocks (``backend(shared_blocks=True)``): the same outputs, each distinct block compiled once."""

import pytest
import torch
import torch._inductor.graph as inductor_graph

import para_fx
import ranks
from traced import each_backend
from para_fx.core.backend import recording
from para_fx.testing import zoo
from para_fx.testing.dits import first_tensor, patch_dit


# The pass is the same whatever compiles its graph: AOTAutograd checks the numbers, Inductor (whose
# C++ build of each new kernel costs about a second of CPU here) only where it lowers the calls.
def _compiled_output(model, inputs, shared, mesh=None, compiler="aot_eager"):
    torch._dynamo.reset()
    backend = para_fx.backend(mesh=mesh, shared_blocks=shared, compiler=compiler)
    with torch.no_grad(), recording() as report:
        out = first_tensor(torch.compile(model, backend=backend)(**inputs))
    return out, report


def assert_same_outputs_with_and_without_shared_blocks(model, inputs):
    """Every block shared, and the outputs of the unshared graph; the shared compile's report.
    Both compile the graph Dynamo traced once (tests/traced.py)."""
    backends = [para_fx.backend(shared_blocks=shared, compiler="aot_eager") for shared in (False, True)]
    (unshared, whole), (report, shared) = each_backend(model, inputs, backends)
    assert not unshared.shared_blocks
    assert set(report.shared_blocks) == set(report.blocks) and report.blocks, report.notes
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    return report


def test_same_outputs_with_and_without_shared_blocks():
    assert_same_outputs_with_and_without_shared_blocks(*patch_dit())


def test_flux_blocks_share_by_kind_with_the_same_outputs_and_the_report_says_so():
    """FLUX's outputs with and without shared blocks, on the model whose blocks share by kind (one
    compile of each: FLUX's are the costliest here)."""
    report = assert_same_outputs_with_and_without_shared_blocks(*zoo.flux(num_layers=3, num_single_layers=4))
    calls = report.shared_blocks
    double = {calls[f"transformer_blocks.{i}"] for i in range(3)}
    single = [calls[f"single_transformer_blocks.{i}"] for i in range(4)]
    assert len(double) == 1 and double.isdisjoint(single)
    # the middle single blocks share; the first reads whole streams rather than pieces of the
    # previous single block's output, and the last returns only the image tokens
    assert single[1] == single[2] and len(set(single)) == 3
    assert ["blocks shared", "7 blocks as calls of 4 distinct subgraphs"] in report.summary()


def test_a_stack_of_identical_blocks_is_lowered_once(monkeypatch):
    lowered = []
    make_subgraph = inductor_graph.GraphLowering.make_subgraph

    def counting(self, *args, **kwargs):
        lowered.append(kwargs.get("subgraph_name"))
        return make_subgraph(self, *args, **kwargs)

    monkeypatch.setattr(inductor_graph.GraphLowering, "make_subgraph", counting)
    model, inputs = patch_dit(depth=4)
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would lower nothing
        out, report = _compiled_output(model, inputs, shared=True, compiler="inductor")
    assert len(report.shared_blocks) == 4 and len(set(report.shared_blocks.values())) == 1
    assert len(lowered) == 1, lowered
    with torch.no_grad():
        torch.testing.assert_close(out, model(**inputs), rtol=1e-5, atol=1e-5)


def ulysses_flux_with_shared_blocks():
    """On each of 2 ranks: FLUX tiny with shared blocks over a Ulysses mesh."""
    model, inputs = zoo.flux()
    out, report = _compiled_output(model, inputs, True, para_fx.init_mesh(ulysses=2))
    outside_blocks = report.graphs.get("shared_blocks", "")  # the main graph once the blocks are calls
    return out, dict(report.shared_blocks), report.notes, len(report.collectives), outside_blocks


ranks.add(2, "shared blocks: FLUX on Ulysses 2", ulysses_flux_with_shared_blocks)


@pytest.mark.ranks
def test_ulysses_collectives_inside_shared_blocks():
    model, inputs = zoo.flux()
    with torch.no_grad():
        expected = first_tensor(model(**inputs))
    for shared, calls, notes, collectives, outside_blocks in ranks.result(2, "shared blocks: FLUX on Ulysses 2"):
        assert len(calls) == 4 and len(set(calls.values())) == 3, notes
        assert collectives and "all_to_all" not in outside_blocks  # the attention's all-to-alls are in the blocks
        torch.testing.assert_close(shared, expected, rtol=1e-4, atol=1e-4)


def test_not_applied_with_the_first_block_cache_and_said_so():
    model, inputs = patch_dit(depth=4)
    torch._dynamo.reset()
    backend = para_fx.backend(cache=para_fx.FirstBlockCache(0.08), compiler="eager", shared_blocks=True)
    with torch.no_grad(), recording() as report:
        out = torch.compile(model, backend=backend)(**inputs)
        torch.testing.assert_close(out, model(**inputs), rtol=1e-5, atol=1e-5)
    assert report.cache is not None and not report.shared_blocks
    assert "shared blocks: not applied with the first block cache (blocks inside its cond)" in report.notes
