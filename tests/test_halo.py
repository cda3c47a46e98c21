"""Convolutions over split image rows (Sana's feed-forward): each rank borrows its neighbours'
border rows. The halo's arithmetic and the rules are in tests/test_rules.py; here a real model."""

import pytest
import torch

import para_fx
from para_fx.inspect.explain import explain_meshes
from para_fx.testing import zoo
from para_fx.testing.dits import first_tensor
import ranks


@pytest.fixture(scope="module")
def sana_reports():
    """Sana's reports on 2 and 3 simulated ranks, Dynamo tracing it once (explain_meshes)."""
    model, kwargs = zoo.sana()
    torch._dynamo.reset()
    reports = explain_meshes(model, [dict(world_size=2), dict(world_size=3)], kwargs=kwargs)
    torch._dynamo.reset()
    return reports


def test_sana_splits_its_rows_and_exchanges_one_border_row_per_convolution(sana_reports):
    """16 rows of 16 tokens over 2 ranks: 8 whole rows each, so the tokens' view as (rows, columns)
    stays split, and each block's 3x3 depthwise convolution exchanges one row with the neighbour."""
    report = sana_reports[0]
    assert report.graph_count == 1
    assert not report.fallbacks, report.fallbacks
    halos = [(c.module, c.kind) for c in report.collectives if c.module.endswith("ff.conv_depth")]
    assert halos == [(f"transformer_blocks.{i}.ff.conv_depth", "all_to_all_single") for i in range(2)], halos
    assert not [c for c in report.collectives if "blocks." in c.module and c.kind.startswith("all_gather")]


def test_rows_that_three_ranks_cannot_split_evenly_are_gathered_and_reported(sana_reports):
    report = sana_reports[1]
    reasons = {f.reason for f in report.fallbacks if "blocks." in f.module}
    assert any("splits the sharded dim 1 unevenly" in reason for reason in reasons), reasons


def sana_errors():
    """Sana with one block on Ulysses 2 at 16x16 and on Ring 2 at 12x10 (6 rows of 10 per rank),
    against one process (the two blocks of the structure tests above meet on split rows alike)."""
    errors = []
    for (height, width), (ring, ulysses) in (((16, 16), (1, 2)), ((12, 10), (2, 1))):
        model, kwargs = zoo.sana(height=height, width=width, num_layers=1)
        torch._dynamo.reset()
        mesh = para_fx.init_mesh(ring=ring, ulysses=ulysses)
        with torch.no_grad():
            expected = first_tensor(model(**kwargs))
            compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler="eager"))
            errors.append((first_tensor(compiled(**kwargs)) - expected).abs().max().item())
    return errors


ranks.add(2, "halo sana", sana_errors)


@pytest.mark.ranks
def test_sana_on_two_ranks_matches_one_process():
    errors = ranks.result(2, "halo sana")
    assert max(max(per_rank) for per_rank in errors) <= 1e-5, errors
