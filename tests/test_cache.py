"""First Block Cache: one graph with a torch.cond, the skip rules, and the same decisions on every rank."""

import contextlib
import functools

import pytest
import torch
import torch.distributed as dist

import para_fx
from para_fx.runtime.cache import runtime_of
from para_fx.testing import dits, zoo
from para_fx.testing.dits import first_tensor
import ranks

FACTORIES = {**zoo.FACTORIES, **dits.FACTORIES}
TIMESTEP_SCALES = (1.0, 0.99, 0.6, 0.595, 0.3, 0.298)  # small and large changes between steps


def at_step(kwargs, step):
    """The model's inputs at one step of a made-up trajectory: the timestep and the latent move."""
    scale = TIMESTEP_SCALES[step]
    latent = "hidden_states" if "hidden_states" in kwargs else "x"
    return {**kwargs, "timestep": kwargs["timestep"] * scale, latent: kwargs[latent] * (0.5 + scale)}


def compiled(model, cache=None, mesh=None, compiler="eager"):
    torch._dynamo.reset()
    return torch.compile(model, backend=para_fx.backend(mesh=mesh, cache=cache, compiler=compiler))


def trajectory(fn, kwargs, steps):
    with torch.no_grad():
        return [first_tensor(fn(**at_step(kwargs, s))) for s in range(steps)]


def cached_trajectory(model, kwargs, cache, steps, mesh=None, compiler="eager"):
    return session_trajectory(compiled(model, cache, mesh, compiler), kwargs, steps)


def session_trajectory(fn, kwargs, steps):
    """One cache session of ``steps`` calls of the compiled ``fn``: the outputs and the statistics."""
    with para_fx.cache_session(fn):
        outs = trajectory(fn, kwargs, steps)
    return outs, para_fx.cache_stats(fn)


def test_one_graph_with_a_cond_around_the_middle_blocks():
    model, kwargs = zoo.flux()
    report = para_fx.explain(model, kwargs=kwargs, cache=para_fx.FirstBlockCache())
    assert report.graph_count == 1
    assert "torch.ops.higher_order.cond" in report.graphs["cache"]
    assert report.blocks == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    assert report.cache.computed_first == ["transformer_blocks.0"]
    assert report.cache.skippable == report.blocks[1:]
    assert "torch.cond" in str(report)
    # said by module, not by graph node: the image stream from the first block to the last
    assert report.cache.streams == ["transformer_blocks.0 -> single_transformer_blocks.1 [1x35x64]"]
    assert report.cache.decision == [
        "x_embedder -> transformer_blocks.0 [1x35x64]", "context_embedder -> transformer_blocks.0 [1x7x64]"
    ]


def test_compute_last_keeps_the_last_blocks_out_of_the_cond():
    model, kwargs = dits.patch_dit(depth=4)
    report = para_fx.explain(model, kwargs=kwargs, cache=para_fx.FirstBlockCache(compute_first=1, compute_last=1))
    assert (report.cache.computed_first, report.cache.skippable, report.cache.computed_last) == (
        ["blocks.0"],
        ["blocks.1", "blocks.2"],
        ["blocks.3"],
    )
    model, kwargs = dits.patch_dit(depth=2)
    report = para_fx.explain(model, kwargs=kwargs, cache=para_fx.FirstBlockCache(compute_first=1, compute_last=1))
    assert report.cache is None and "first block cache not applied" in report.notes[0]


def test_threshold_zero_equals_the_uncached_model_at_every_step():
    model, kwargs = dits.patch_dit()
    expected = trajectory(compiled(model), kwargs, 4)
    repeated = {**kwargs}  # a repeated step has a change of 0: threshold 0 must still compute it
    outs, stats = cached_trajectory(model, kwargs, para_fx.FirstBlockCache(threshold=0), 4)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (stats.steps, stats.computed, stats.skipped) == (4, 4, 0)
    fn = compiled(model, para_fx.FirstBlockCache(threshold=0))
    with para_fx.cache_session(fn), torch.no_grad():
        fn(**repeated), fn(**repeated)
    assert para_fx.cache_stats(fn).diffs == [0.0] and para_fx.cache_stats(fn).skipped == 0


def test_a_skipped_step_adds_the_stored_residual_to_the_first_block_output():
    model, kwargs = dits.patch_dit(depth=3)
    outs, stats = cached_trajectory(model, kwargs, para_fx.FirstBlockCache(threshold=1e9), 2)
    assert (stats.computed, stats.skipped) == (1, 1)

    seen = {}
    record = lambda name: lambda module, args, out: seen.__setitem__(name, out)
    first = model.blocks[0].register_forward_hook(record("first"))
    last = model.blocks[-1].register_forward_hook(record("last"))
    with torch.no_grad():
        computed = model(**at_step(kwargs, 0))
        residual = seen["last"] - seen["first"]
        last.remove()
        replace = model.blocks[-1].register_forward_hook(lambda module, args, out: seen["first"] + residual)
        skipped = model(**at_step(kwargs, 1))
        replace.remove()
        first.remove()
        full = model(**at_step(kwargs, 1))
    torch.testing.assert_close(outs[0], computed, rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[1], skipped, rtol=0, atol=1e-5)
    assert (outs[1] - full).abs().max() > 1e-3  # the skip did change the result


@pytest.mark.parametrize(
    "settings, pattern",
    [
        (dict(warmup_steps=2), "CCSSS"),
        (dict(max_consecutive_skips=1), "CSCSC"),
        (dict(max_consecutive_skips=2), "CSSCS"),
        (dict(max_consecutive_skips=0), "CCCCC"),
    ],
)
def test_warmup_and_consecutive_skip_cap(settings, pattern):
    """The step-by-step sequence, not only the counts: CCSSS and CSSCS skip as many steps."""
    model, kwargs = dits.patch_dit()
    fn = compiled(model, para_fx.FirstBlockCache(threshold=1e9, **settings))
    seen = ""
    with para_fx.cache_session(fn), torch.no_grad():
        for step in range(5):
            before = para_fx.cache_stats(fn).skipped if step else 0  # the running count inside the session
            fn(**at_step(kwargs, step))
            seen += "S" if para_fx.cache_stats(fn).skipped > before else "C"
    stats = para_fx.cache_stats(fn)
    assert seen == pattern
    assert (stats.steps, stats.computed, stats.skipped) == (5, pattern.count("C"), pattern.count("S"))
    assert len(stats.diffs) == 4


def test_a_call_reads_back_only_the_conds_predicate():
    """The skip count, the kept prefix and the statistics stay on the device: a step waits for the
    GPU once (the cond's branch), and the counts are read when asked for."""
    model, kwargs = dits.patch_dit()
    fn = compiled(model, para_fx.FirstBlockCache(threshold=1e9, max_consecutive_skips=2))
    host_reads = []
    with para_fx.cache_session(fn), torch.no_grad():
        for step in range(5):
            with torch.profiler.profile() as prof:
                fn(**at_step(kwargs, step))
            host_reads.append(sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense"))
    stats = para_fx.cache_stats(fn)
    assert host_reads == [1] * 5
    assert (stats.steps, stats.computed, stats.skipped, len(stats.diffs)) == (5, 2, 3, 4)  # CSSCS


def test_counts_read_along_the_way_add_up(monkeypatch):
    """A long run outside a session reads its counts every so many calls (bounded memory); the
    totals are the same as read once."""
    monkeypatch.setattr(para_fx.runtime.cache, "_READ_EVERY", 2)
    model, kwargs = dits.patch_dit()
    fn = compiled(model, para_fx.FirstBlockCache(threshold=1e9, max_consecutive_skips=2))
    with para_fx.cache_session(fn), torch.no_grad():
        for step in range(5):
            fn(**at_step(kwargs, step))
    stats = para_fx.cache_stats(fn)
    assert (stats.steps, stats.computed, stats.skipped, len(stats.diffs)) == (5, 2, 3, 4)


def test_a_session_starts_fresh_and_reports_itself():
    model, kwargs = dits.patch_dit()
    fn = compiled(model, para_fx.FirstBlockCache(threshold=1e9))
    with para_fx.cache_session(fn), torch.no_grad():
        first = [first_tensor(fn(**at_step(kwargs, s))) for s in (0, 1, 2)]
    assert (para_fx.cache_stats(fn).computed, para_fx.cache_stats(fn).skipped) == (1, 2)
    with para_fx.cache_session(fn), torch.no_grad():
        again = first_tensor(fn(**at_step(kwargs, 2)))  # a new generation: computed, not skipped
        assert para_fx.cache_stats(fn).steps == 1  # live count inside the session
    stats = para_fx.cache_stats(fn)
    assert (stats.steps, stats.computed, stats.skipped, stats.diffs) == (1, 1, 0, [])
    with torch.no_grad():
        torch.testing.assert_close(again, first_tensor(model(**at_step(kwargs, 2))), rtol=0, atol=1e-5)
    assert (first[2] - again).abs().max() > 1e-3


def test_call_contexts_keep_separate_state():
    model, kwargs = dits.patch_dit()
    other = {**kwargs, "pooled": -kwargs["pooled"]}  # say, the unconditional branch
    with torch.no_grad():
        expected = {"cond": first_tensor(model(**kwargs)), "uncond": first_tensor(model(**other))}
    fn = compiled(model, para_fx.FirstBlockCache(threshold=1e9))
    with para_fx.cache_session(fn), torch.no_grad():
        for _ in range(2):
            for name, inputs in (("cond", kwargs), ("uncond", other)):
                with para_fx.cache_context(fn, name):
                    out = first_tensor(fn(**inputs))
                torch.testing.assert_close(out, expected[name], rtol=0, atol=1e-5)
    stats = para_fx.cache_stats(fn)
    assert (stats.computed, stats.skipped) == (2, 2)  # each context computes its first step


def test_inductor_runs_the_cond():
    model, kwargs = dits.patch_dit(depth=3)
    cache = para_fx.FirstBlockCache(threshold=0.15)
    reference, ref_stats = cached_trajectory(model, kwargs, cache, 4)
    outs, stats = cached_trajectory(model, kwargs, cache, 4, compiler="inductor")
    assert (stats.computed, stats.skipped) == (ref_stats.computed, ref_stats.skipped) and stats.skipped >= 1
    assert stats.diffs == pytest.approx(ref_stats.diffs, rel=1e-4)
    for out, ref in zip(outs, reference):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="compute_first"):
        para_fx.FirstBlockCache(compute_first=0)
    with pytest.raises(ValueError, match="threshold"):
        para_fx.FirstBlockCache(threshold=-1)
    with pytest.raises(TypeError, match="FirstBlockCache"):
        para_fx.backend(cache=0.08)
    with pytest.raises(ValueError, match="no First Block Cache"):
        para_fx.cache_stats(torch.compile(torch.nn.Linear(2, 2), backend=para_fx.backend()))


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("threshold", "0.1", TypeError, "threshold must be a number, got str '0.1'"),
        ("threshold", True, TypeError, "threshold must be a number"),
        ("threshold", float("nan"), ValueError, "threshold must be >= 0"),
        ("warmup_steps", 1.5, TypeError, "warmup_steps must be an int"),
        ("max_consecutive_skips", -1, ValueError, "max_consecutive_skips must be >= 0"),
        ("compute_last", "1", TypeError, "compute_last must be an int"),
    ],
)
def test_settings_are_checked_by_type_and_range(field, value, error, message):
    with pytest.raises(error, match=message):
        para_fx.FirstBlockCache(**{field: value})


def test_assignments_after_construction_are_checked():
    cache = para_fx.FirstBlockCache(threshold=0.08)
    with pytest.raises(ValueError, match="threshold must be >= 0, got -1"):
        cache.threshold = -1
    with pytest.raises(TypeError, match="max_consecutive_skips must be None or an int"):
        cache.max_consecutive_skips = "2"
    assert cache.threshold == 0.08 and cache.max_consecutive_skips is None
    cache.threshold, cache.warmup_steps = 0.2, 3  # read at every call: allowed between calls
    assert (cache.threshold, cache.warmup_steps) == (0.2, 3)
    with pytest.raises(AttributeError, match="compute_first is compiled into the graph"):
        cache.compute_first = 2
    assert cache.compute_first == 1


def test_a_call_with_autograd_on_keeps_no_graph_in_the_state():
    model, kwargs = zoo.flux()
    cache = para_fx.FirstBlockCache(threshold=0.08)
    fn = compiled(model, cache)
    with para_fx.cache_session(fn):
        for step in range(2):  # grad mode on, as a user who forgot torch.no_grad() runs it
            fn(**at_step(kwargs, step))
    state = next(iter(runtime_of(cache).states.values()))
    assert all(not t.requires_grad for t in state.prefix + state.region)
    assert para_fx.cache_stats(fn).steps == 2


# --- the same decisions on every rank ------------------------------------------------------------

MODELS = ("flux", "wan", "patch_dit")
STEPS = 6
# FLUX with one block of each kind (the first computed, the single-stream one skippable), as on
# the ranks of tests/test_shard.py: the decisions and the cond are the same with two of each
CONFIG = {"flux": dict(num_layers=1, num_single_layers=1)}


def threshold_between_steps(diffs):
    """A threshold halfway (in log space) across the widest gap of the observed changes, so that
    rounding differences between 1 and N ranks cannot flip a decision."""
    ordered = sorted(diffs)
    low, high = max(zip(ordered, ordered[1:]), key=lambda pair: pair[1] / pair[0])
    assert high / low > 1.5, f"no clear gap between the changes {ordered}"
    return (low * high) ** 0.5


@functools.cache
def reference_runs():
    """Single process: per model, the threshold that skips some steps, the outputs and the stats.
    One compile per model: the threshold is read at every call, so the probe at threshold 0 and the
    run at the threshold found are two sessions of one compiled model (test_single_device_compile_and_cache
    in tests/test_pipelines.py: a new threshold compiles nothing again)."""
    runs = {}
    for name in MODELS:
        model, kwargs = FACTORIES[name](batch=2, **CONFIG.get(name, {}))
        cache = para_fx.FirstBlockCache(threshold=0)
        fn = compiled(model, cache)
        _, probe = session_trajectory(fn, kwargs, STEPS)
        cache.threshold = threshold = threshold_between_steps(probe.diffs)
        outs, stats = session_trajectory(fn, kwargs, STEPS)
        assert 0 < stats.skipped < STEPS - 1, (name, probe.diffs, threshold)
        runs[name] = (threshold, outs, stats)
    return runs


def thresholds():
    return {name: threshold for name, (threshold, _, _) in reference_runs().items()}


def ranks_cached(mesh_shape, name, thresholds):
    """On one rank: the model's cached trajectory on the mesh, at the single-process run's threshold."""
    mesh = para_fx.init_mesh(batch=mesh_shape[0], ring=mesh_shape[1], ulysses=mesh_shape[2])
    model, kwargs = FACTORIES[name](batch=2, **CONFIG.get(name, {}))
    outs, stats = cached_trajectory(model, kwargs, para_fx.FirstBlockCache(threshold=thresholds[name]), STEPS, mesh)
    return outs, stats, dist.get_rank()


# Every model where the decision is agreed over the batch group (2 ranks), and the plain DiT where
# it is agreed over the sequence group (Ulysses 2): FLUX's and Wan's cached pipelines run there, in
# tests/test_pipelines.py (every step's output and the cache's statistics against the cached single
# process, on every rank; Wan's with its two states, cond and uncond). On 4 ranks, where two groups
# agree, one model per mesh: FLUX on Ring 2 x Ulysses 2 (also its hybrid outputs, which
# tests/test_shard.py does not run again) and the plain DiT on batch 2 x Ulysses 2.
SAME_BRANCH = [((1, 1, 2), "patch_dit")] + [((2, 1, 1), name) for name in MODELS] + [
    ((1, 2, 2), "flux"),
    ((2, 1, 2), "patch_dit"),
]


def same_branch_case(mesh_shape, name):
    """(world size, case name) of a model's cached run on a mesh."""
    return mesh_shape[0] * mesh_shape[1] * mesh_shape[2], f"cache {ranks.mesh_id(mesh_shape)} {name}"


for _mesh_shape, _name in SAME_BRANCH:
    ranks.add(*same_branch_case(_mesh_shape, _name), ranks_cached, _mesh_shape, _name, prepared=thresholds)


@pytest.mark.ranks
@pytest.mark.parametrize("mesh_shape, name", SAME_BRANCH, ids=ranks.mesh_id)
def test_ranks_take_the_same_branch_as_one_process(mesh_shape, name):
    _, expected, expected_stats = reference_runs()[name]
    for outs, stats, rank in ranks.result(*same_branch_case(mesh_shape, name)):
        assert (stats.computed, stats.skipped) == (expected_stats.computed, expected_stats.skipped), (name, rank)
        assert stats.diffs == pytest.approx(expected_stats.diffs, rel=1e-3), (name, rank)
        assert len(outs) == STEPS
        for out, ref in zip(outs, expected):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"{name} rank {rank}")


# --- quality on a trained model ------------------------------------------------------------------


def test_trade_off_on_the_trained_digits_dit():
    """Pins the README's table (100 samples) on 20: 0.08 skips 15 of 28 at 40 dB, 0.2 skips 22 at 32 dB."""
    from examples.digits import cache_study as study

    recommended, aggressive = study.study(samples=20, thresholds=(0.08, 0.2))
    assert 12 <= recommended["skipped"] <= 17 and recommended["psnr_db"] >= 36
    assert 19 <= aggressive["skipped"] <= 24 and 29 <= aggressive["psnr_db"] < recommended["psnr_db"]


# --- host state cannot split the ranks; state per model instance ----------------------------------


def ranks_with_different_host_state():
    """Rank 1 never allows a skip (threshold 0, then a fresh session mid-way); rank 0 always would."""
    rank = dist.get_rank()
    model, kwargs = dits.patch_dit(depth=3)
    cache = para_fx.FirstBlockCache(threshold=0.0 if rank == 1 else 1e9)
    fn = compiled(model, cache, para_fx.init_mesh())
    outs, pattern = [], ""
    with para_fx.cache_session(fn), torch.no_grad():
        for step in range(4):
            with contextlib.ExitStack() as stack:
                if rank == 1 and step == 2:
                    cache.threshold = 1e9  # allowed again, but a new session: no state to skip against
                    stack.enter_context(para_fx.cache_session(fn))
                before = runtime_of(cache).running(None).skipped
                outs.append(first_tensor(fn(**at_step(kwargs, step))))
                pattern += "S" if runtime_of(cache).running(None).skipped > before else "C"
    return outs, pattern


ranks.add(2, "cache host state differs", ranks_with_different_host_state)


@pytest.mark.ranks
def test_ranks_whose_host_state_differs_take_one_branch_and_never_hang():
    model, kwargs = dits.patch_dit(depth=3)
    expected = trajectory(compiled(model), kwargs, 4)
    per_rank = ranks.result(2, "cache host state differs")
    for outs, pattern in per_rank:
        assert pattern == "CCCS"  # the only step both ranks may skip: the last
        for out, ref in zip(outs[:3], expected[:3]):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_rank[0][0][3], per_rank[1][0][3])


def two_models_one_backend(world):
    """Two instances of one architecture (one Dynamo graph: weights are inputs), one cache."""
    mesh = para_fx.init_mesh() if world > 1 else None
    (model_a, kwargs), (model_b, _) = dits.patch_dit(seed=0, depth=3), dits.patch_dit(seed=1, depth=3)
    backend = para_fx.backend(mesh=mesh, cache=para_fx.FirstBlockCache(threshold=1e9), compiler="eager")
    torch._dynamo.reset()
    a, b = torch.compile(model_a, backend=backend), torch.compile(model_b, backend=backend)
    with torch.no_grad():
        with para_fx.cache_session(a), para_fx.cache_session(b):
            a(**kwargs)
            b_first = b(**kwargs)  # its own first step: computed, not skipped against a's residual
            with para_fx.cache_session(a):  # a fresh session for a alone
                a(**kwargs)
            b_second = b(**kwargs)  # b's state survived a's session: skipped
        eager_b = model_b(**kwargs)
    return b_first, b_second, eager_b, para_fx.cache_stats(a), para_fx.cache_stats(b)


ranks.add(2, "cache two models", two_models_one_backend, 2)


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.ranks)])
def test_two_models_of_one_architecture_keep_their_own_state(world):
    results = ranks.result(2, "cache two models") if world > 1 else [two_models_one_backend(1)]
    for b_first, b_second, eager_b, stats_a, stats_b in results:
        torch.testing.assert_close(b_first, eager_b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b_second, eager_b, rtol=1e-4, atol=1e-4)  # same input: the skip adds b's residual
        assert (stats_a.steps, stats_a.computed) == (1, 1)  # a's last session
        assert (stats_b.steps, stats_b.computed, stats_b.skipped) == (2, 1, 1)
