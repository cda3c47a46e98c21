"""The diffusers adapters end to end: tiny real pipelines, on one process and on 2 gloo ranks.

Every pipeline is built from the real diffusers classes with random tiny components
(para_fx.testing.tiny_pipelines) and given prompt embeddings directly. On 2 ranks each rank runs
the whole pipeline; its decoded output must equal the single-process pipeline's (fp32,
<= 1e-4), and with the First Block Cache the single-process cached pipeline's, with the same
cache statistics on every rank. The five pipelines are cases of the world-2 spawn of
tests/ranks.py, and each also decodes its latents with the parallel VAE, against the single
process; Mochi's attention structure is read in-process on a simulated mesh.
"""

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

import para_fx
from para_fx.inspect.explain import explain_meshes
from para_fx.adapters.diffusers import (
    apply_cache_on_pipe,
    context_parallel_degrees,
    init_context_parallel_mesh,
    last_cache_stats,
    make_traceable,
    parallelize_pipe,
    parallelize_vae,
)
from para_fx.testing import tiny_pipelines, zoo
import ranks

TOLERANCE = 1e-4
STEPS = 4
# Skip whenever allowed, but never twice in a row: compute, skip, compute, skip. The tiny
# models' residual changes (0.05-0.5) are far from the threshold, so rounding cannot flip a decision.
CACHE = dict(residual_diff_threshold=1.0, max_consecutive_skips=1)


def frames(output):
    return output.images if hasattr(output, "images") else output.frames


def generate(pipe, kwargs, **extra):
    return frames(pipe(**kwargs, generator=torch.Generator().manual_seed(0), **extra))


def max_error(a, b):
    return (a - b).abs().max().item()


def test_degrees_prefer_batch_up_to_its_limit_then_ulysses_then_ring():
    assert context_parallel_degrees(1) == (1, 1, 1)
    assert context_parallel_degrees(8) == (1, 1, 8)
    assert context_parallel_degrees(8, max_ulysses_dim_size=2) == (1, 4, 2)
    assert context_parallel_degrees(8, max_batch_dim_size=2) == (2, 1, 4)
    assert context_parallel_degrees(6, max_batch_dim_size=4) == (3, 1, 2)
    # the largest batch (4) would leave 3 ranks that ulysses <= 2, ring <= 2 cannot hold
    assert context_parallel_degrees(12, max_batch_dim_size=4, max_ring_dim_size=2, max_ulysses_dim_size=2) == (3, 2, 2)


def test_degrees_reject_impossible_limits():
    with pytest.raises(ValueError, match="no batch x ring x ulysses split of the world size 8"):
        context_parallel_degrees(8, max_ring_dim_size=2, max_ulysses_dim_size=2)
    with pytest.raises(ValueError, match="max_ring_dim_size must be None or a positive int"):
        context_parallel_degrees(2, max_ring_dim_size=0)


def test_without_process_group_the_mesh_is_a_single_device():
    assert init_context_parallel_mesh() is None


def test_make_traceable_gives_mochi_one_graph_and_equal_outputs():
    model, kwargs = zoo.mochi(batch=2, text_pad=3)
    kwargs["encoder_attention_mask"][1, 2:] = False  # the second sample keeps 2 of 7 text tokens
    with torch.no_grad():
        expected = model(**kwargs)[0]
        assert make_traceable(model) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
        assert max_error(model(**kwargs)[0], expected) <= TOLERANCE
        report = para_fx.explain(model, kwargs=kwargs)
        assert report.graph_count == 1
        compiled = torch.compile(model, backend=para_fx.backend(compiler="eager"))
        assert max_error(compiled(**kwargs)[0], expected) <= TOLERANCE
        # a valid token after a padded one: the stock processor would reorder the text, so refuse
        kwargs["encoder_attention_mask"][0, 0] = False
        with pytest.raises(RuntimeError, match="valid token after a padded one"):
            compiled(**kwargs)


def test_make_traceable_leaves_other_models_alone():
    model, _ = zoo.flux()
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert make_traceable(model) == []
    assert [m.processor for m in model.modules() if hasattr(m, "processor")] == processors


def test_single_device_compile_and_cache():
    pipe, kwargs = tiny_pipelines.flux(steps=STEPS)
    pipe_class = type(pipe)
    expected = generate(pipe, kwargs)
    parallelize_pipe(pipe, compiler="eager")
    assert type(pipe).__name__ == pipe_class.__name__ and isinstance(pipe, pipe_class)
    assert type(pipe) is not pipe_class and type(tiny_pipelines.flux()[0]) is pipe_class  # per instance
    assert max_error(generate(pipe, kwargs), expected) <= TOLERANCE
    apply_cache_on_pipe(pipe, **CACHE)
    generate(pipe, kwargs)
    stats = last_cache_stats(pipe)
    assert (stats.steps, stats.computed, stats.skipped) == (STEPS, 2, 2)
    # a new threshold only: no recompilation; 0 never skips, so the output is the uncached one again
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    apply_cache_on_pipe(pipe, residual_diff_threshold=0.0, max_consecutive_skips=1)
    assert max_error(generate(pipe, kwargs), expected) <= TOLERANCE
    assert last_cache_stats(pipe).skipped == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_wrapping_the_adapted_transformer_in_torch_compile_is_refused():
    pipe, kwargs = tiny_pipelines.flux(steps=1)
    parallelize_pipe(pipe, compiler="eager")
    pipe.transformer = torch.compile(pipe.transformer)
    with pytest.raises(TypeError, match="Remove the torch.compile line"):
        pipe(**kwargs)


# The passes' graphs run as they are: these cases check the adapters' numbers; the same pipelines
# run through AOTAutograd (aot_eager, --tiny's default) as examples (tests/test_examples.py).
COMPILER = "eager"

# Mesh limits per pipeline, so that 2 ranks cover Ulysses, Ring and CFG batch parallelism.
MESHES = {
    "flux": ({}, (1, 1, 2)),
    "hunyuan_video": (dict(max_ulysses_dim_size=1), (1, 2, 1)),
    "mochi": ({}, (1, 1, 2)),
    "cogvideox": (dict(max_batch_dim_size=2), (2, 1, 1)),
    "wan": ({}, (1, 1, 2)),
}


@functools.cache
def single_process(name):
    """The single-process outputs without and with the cache, and the cached run's statistics:
    made once, in the parent, and sent to the ranks (not made again on every rank)."""
    pipe, kwargs = tiny_pipelines.BUILDERS[name](steps=STEPS)
    expected = generate(pipe, kwargs)
    single = tiny_pipelines.BUILDERS[name](steps=STEPS)[0]
    apply_cache_on_pipe(single, compiler=COMPILER, **CACHE)
    expected_cached = generate(single, kwargs)
    torch._dynamo.reset()
    return expected, expected_cached, dataclasses.asdict(last_cache_stats(single))


def run_pipeline(name, reference):
    """On one rank: the parallel pipeline with and without the cache's skips, against the single-process ones.

    One compile, with the cache: the cache pass takes the graph the shard passes made (the blocks
    after the first in a branch of their own), so at threshold 0 (a new threshold, no recompile)
    every step runs every sharded block, as the pipeline without the cache does (tested on one
    device in test_single_device_compile_and_cache). The graphs without the cache are compiled on
    2 ranks in the examples (tests/test_examples.py) and model by model in tests/test_shard.py.
    """
    expected, expected_cached, expected_stats = reference
    pipe, kwargs = tiny_pipelines.BUILDERS[name](steps=STEPS)
    limits, _ = MESHES[name]
    mesh = init_context_parallel_mesh(**limits)
    parallelize_pipe(pipe, mesh, compiler=COMPILER)
    apply_cache_on_pipe(pipe, **CACHE)
    decoder_rows = first_conv_rows(pipe.vae.decoder)
    cached = generate(pipe, kwargs)
    stats = dataclasses.asdict(last_cache_stats(pipe))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    apply_cache_on_pipe(pipe, residual_diff_threshold=0.0, max_consecutive_skips=1)  # never skips
    parallel = generate(pipe, kwargs)
    result = dict(
        mesh=tuple(mesh.shape),
        error=max_error(parallel, expected),
        never_skipped=last_cache_stats(pipe).skipped == 0,
        recompiled=torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs,
        cached_error=max_error(cached, expected_cached),
        cache_changed_output=max_error(cached, parallel),
        stats=stats,
        expected_stats=expected_stats,
    )
    if name != "flux":  # FLUX's parallel decode: default_call_behaviour
        # the pipeline's own decode of its latents, split by height over the ranks (as the examples run it)
        whole_calls = len(decoder_rows)
        parallelize_vae(pipe.vae, mesh)
        result["parallel_vae_error"] = max_error(generate(pipe, kwargs), expected)
        result["decoder_rows"] = max(decoder_rows[:whole_calls]), max(decoder_rows[whole_calls:])  # whole, then chunks
    if name == "wan":  # the cache first, then parallelism: the same result
        other = tiny_pipelines.wan(steps=STEPS)[0]
        apply_cache_on_pipe(other, **CACHE)
        parallelize_pipe(other, mesh, compiler=COMPILER)
        result["cache_first_error"] = max_error(generate(other, kwargs), cached)
    if name == "flux":
        result.update(default_call_behaviour(pipe, kwargs, mesh, parallel))
    return result


def default_call_behaviour(pipe, kwargs, mesh, expected):
    """No generator: the ranks agree on a seed. No output_type: rank 0 decodes to PIL, the others
    return latents, or decoded tensors once the VAE is parallel (every rank must then decode)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "output_type"}
    unseeded = frames(pipe(**kwargs, output_type="pt"))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, unseeded)
    default = generate(pipe, kwargs)
    parallelize_vae(pipe.vae, mesh)
    with_parallel_vae = generate(pipe, kwargs)
    return dict(
        unseeded_rank_difference=max(max_error(x, gathered[0]) for x in gathered),
        default_output=describe(default),
        parallel_vae_output=describe(with_parallel_vae),
        parallel_vae_error=None if isinstance(with_parallel_vae, list) else max_error(with_parallel_vae, expected),
    )


def first_conv_rows(module):
    """The heights that the module's first conv sees, one per call (tests/test_vae.py's check that inputs were split)."""
    conv = next(m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    seen = []
    conv.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2]))
    return seen


def describe(images):
    return type(images[0]).__name__ if isinstance(images, list) else tuple(images.shape)


def test_mochi_attention_is_split_on_two_ranks():
    """Structure, on a simulated mesh (the pipeline's numbers are checked on real ranks below)."""
    model, kwargs = zoo.mochi(batch=2, text_pad=3)
    make_traceable(model)
    torch._dynamo.reset()
    # init_context_parallel_mesh(): ulysses 2, as rank 0 and as rank 1; Dynamo traces the model once
    reports = explain_meshes(model, [dict(world_size=2, rank=rank) for rank in (0, 1)], kwargs=kwargs)
    for report in reports:
        assert report.graph_count == 1
        sites = sorted({(s.module, s.strategy, s.local_query_len, s.global_query_len) for s in report.attention_sites})
        joint = [s for s in sites if s[0].endswith("attn1")]
        assert len(joint) == 2 and all(local <= total // 2 + 1 for _, _, local, total in joint), sites
        assert any(strategy == "ulysses" for _, strategy, _, _ in joint), sites
        block_fallbacks = [f.op for f in report.fallbacks if "blocks." in f.module]
        assert not block_fallbacks, block_fallbacks
    torch._dynamo.reset()


for _name in MESHES:
    ranks.add(2, f"pipeline {_name}", run_pipeline, _name, prepared=functools.partial(single_process, _name))


@pytest.mark.ranks
@pytest.mark.parametrize("name", list(MESHES))
def test_two_ranks_match_single_process(name):
    results = ranks.result(2, f"pipeline {name}")
    for rank, r in enumerate(results):
        where = f"{name} rank {rank}"
        assert r["mesh"] == MESHES[name][1], where
        assert r["error"] <= TOLERANCE, f"{where}: parallel vs single process: {r['error']}"
        assert r["never_skipped"] and not r["recompiled"], where
        assert r["cached_error"] <= TOLERANCE, f"{where}: cached parallel vs cached single process: {r['cached_error']}"
        assert r["cache_changed_output"] > TOLERANCE, f"{where}: the cache skipped nothing visible"
        stats, expected = r["stats"], r["expected_stats"]
        calls = STEPS * (2 if name == "wan" else 1)  # Wan calls the transformer for cond and uncond
        assert (stats["steps"], stats["skipped"]) == (calls, calls // 2), f"{where}: {stats}"
        assert (stats["computed"], stats["skipped"]) == (expected["computed"], expected["skipped"]), where
        assert stats["diffs"] == pytest.approx(expected["diffs"], abs=TOLERANCE), where
        assert stats == results[0]["stats"], f"{where}: cache statistics differ between ranks"
    if name != "flux":
        for rank, r in enumerate(results):
            assert r["parallel_vae_error"] <= TOLERANCE, f"{name} rank {rank}: parallel decode: {r['parallel_vae_error']}"
            whole, chunk = r["decoder_rows"]
            assert chunk < whole, f"{name} rank {rank}: the decoder saw {chunk} of {whole} latent rows"
    if name == "wan":
        assert all(r["cache_first_error"] <= TOLERANCE for r in results)
    if name == "flux":
        assert all(r["unseeded_rank_difference"] == 0 for r in results)
        assert results[0]["default_output"] == "Image"  # PIL, decoded on rank 0
        assert results[1]["default_output"] == (1, 35, 16)  # packed latents, no decode on rank 1
        assert results[0]["parallel_vae_output"] == "Image"
        assert results[1]["parallel_vae_output"] == (1, 3, 10, 14)  # took part in the decode
        assert results[1]["parallel_vae_error"] <= TOLERANCE
