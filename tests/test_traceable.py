"""make_traceable on models whose graph breaks are in their own code, not in an attention processor.

Each model is diffusers' real class with a tiny random config. Made traceable, it must give the
stock model's outputs (fp32, <= 1e-5), compile to one graph with every attention site split over a
simulated world of 2, give the same outputs on 2 real ranks, and refuse the inputs its static
program cannot follow instead of giving other results. Mochi's processor stand-in is tested in tests/test_pipelines.py.
"""

import copy

import pytest
import torch

import para_fx
from para_fx.adapters.traceable import make_traceable
import ranks

TOLERANCE = 1e-5
SPLIT = {"ulysses", "ring", "hybrid"}


def lumina2(text_valid=(7, 4, 0), text_len=7, height=10, width=10, refiners=1):
    """Lumina2Transformer2DModel with grouped-query attention (3 heads, 1 key/value head); one
    sample per entry of ``text_valid``, its text mask a prefix of that many valid tokens. 10x10
    latents give 25 image tokens, so neither sequence splits evenly over 2 ranks."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    model = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_refiner_layers=refiners,
        num_attention_heads=3, num_kv_heads=1, multiple_of=2, norm_eps=1e-5, axes_dim_rope=(4, 2, 2),
        axes_lens=(32, 32, 32), cap_feat_dim=32,
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    batch = len(text_valid)
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        timestep=torch.rand(batch, generator=g),
        encoder_attention_mask=torch.arange(text_len) < torch.tensor(text_valid)[:, None],
    )
    return model, kwargs


def z_image(text_lens=(7, 40), height=10, width=14, refiners=1):
    """ZImageTransformer2DModel; one sample per entry of ``text_lens``. Unequal caption lengths pad
    to unequal multiples of 32 (32 and 64 tokens), so the model masks its attention."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1, n_refiner_layers=refiners,
        n_heads=1, n_kv_heads=1, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[128, 32, 32],
    ).float().eval()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        x=[torch.randn(16, 1, height, width, generator=g) for _ in text_lens],
        cap_feats=[torch.randn(n, 16, generator=g) for n in text_lens],
        t=torch.rand(len(text_lens), generator=g),
    )
    return model, kwargs


def sample(output) -> torch.Tensor:
    """The model's output as one tensor (Z-Image returns a list, one image per sample)."""
    images = output[0]
    return torch.stack(images) if isinstance(images, list) else images


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_one_graph_all_split(model, kwargs):
    torch._dynamo.reset()
    report = para_fx.explain(model, kwargs=kwargs, world_size=2)
    assert report.graph_count == 1
    assert report.attention_sites and {site.strategy for site in report.attention_sites} <= SPLIT
    assert not [f for f in report.fallbacks if report.in_blocks(f.module)]
    assert not [c for c in report.collectives if c.kind.startswith("all_gather") and report.in_blocks(c.module)]
    return report


def test_lumina2_one_graph_equal_outputs_and_prefix_masks_only():
    model, kwargs = lumina2()
    stock = copy.deepcopy(model)
    assert make_traceable(model) == ["forward"]
    assert make_traceable(model) == []
    assert "forward" not in vars(stock)  # the instance is changed, not the class
    with torch.no_grad():
        expected = sample(stock(**kwargs, return_dict=False))
        assert expected.isfinite().all()
        assert max_error(sample(model(**kwargs, return_dict=False)), expected) <= TOLERANCE
        # every sample with the same text length: the stock model attends without a mask
        equal_lengths = dict(kwargs, encoder_attention_mask=torch.ones_like(kwargs["encoder_attention_mask"]))
        assert max_error(model(**equal_lengths).sample, stock(**equal_lengths).sample) <= TOLERANCE

    # a valid token after a padded one: the stock model would take the first mask.sum() tokens
    shuffled = dict(kwargs, encoder_attention_mask=kwargs["encoder_attention_mask"].clone())
    shuffled["encoder_attention_mask"][1, 0] = False
    refused = "Lumina2 text attention mask has a valid token after a padded one"
    with torch.no_grad(), pytest.raises(RuntimeError, match=refused):
        model(**shuffled)

    # the graph breaks were in the forward, around the blocks (the refiners' attention is
    # structure bench/model_coverage.py records): the cheaper trace, with the joint block only
    model, kwargs = lumina2(refiners=0)
    make_traceable(model)
    report = assert_one_graph_all_split(model, kwargs)
    assert len(report.attention_sites) == 1


def test_z_image_one_graph_equal_outputs():
    model, kwargs = z_image()
    stock = copy.deepcopy(model)
    assert make_traceable(model) == ["rope_embedder"]
    assert make_traceable(model) == []
    with torch.no_grad():
        expected = sample(stock(**kwargs, return_dict=False))
        assert max_error(sample(model(**kwargs, return_dict=False)), expected) <= TOLERANCE

    # the break is in the RoPE of every sequence, which runs without refiner blocks too (the
    # refiners' attention is structure bench/model_coverage.py records): the cheaper trace
    model, kwargs = z_image(refiners=0)
    make_traceable(model)
    report = assert_one_graph_all_split(model, kwargs)
    assert len(report.attention_sites) == 1


def both_on_this_rank():
    """On one rank: each model made traceable and compiled over all ranks (Ulysses), against eager.
    Z-Image's two samples are padded into a batch by ``pad_sequence`` (see tests/test_shard.py)."""
    errors = {}
    for name, factory in (("lumina2", lumina2), ("z_image", z_image)):
        model, kwargs = factory()
        make_traceable(model)
        compiled = torch.compile(model, backend=para_fx.backend(mesh=para_fx.init_mesh(), compiler="eager"))
        with torch.no_grad():
            errors[name] = max_error(sample(compiled(**kwargs, return_dict=False)), sample(model(**kwargs, return_dict=False)))
        torch._dynamo.reset()
    return errors


ranks.add(2, "traceable lumina2 and z_image", both_on_this_rank)


@pytest.mark.ranks
def test_outputs_on_two_ranks_match_one_process():
    for errors in ranks.result(2, "traceable lumina2 and z_image"):
        assert max(errors.values()) <= TOLERANCE, errors
