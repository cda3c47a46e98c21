"""The ``para`` Dynamo backend: capture to aten, run the passes, hand the result to an inner compiler.

``torch.compile(model, backend="para")`` uses :func:`para`: the whole world as one Ulysses group
when torch.distributed is initialised, a single device otherwise. ``para_fx.backend(...)``
builds a configured one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .agreement import check_mode, with_input_check
from .cache import FirstBlockCache
from ..runtime.attention import RING_KV, check_ring_transport
from ..runtime.cache import CachedGraph
from .capture import SubclassFlattener, capture_aten, flatten_subclasses, inline_helpers, input_name, scalar_reads
from .mesh import init_mesh, mesh_info
from .reductions import INDUCTOR_ROW_LIMIT, PERSISTENT_ROW_LIMIT, wide_rows
from .static_inputs import mark_static_inputs, static_flags
from .weight_guards import LayoutCheck, take_over_weight_guards
from ..passes.attention_patterns import recognize_attention
from ..passes.cache import insert_first_block_cache
from ..passes.cse import merge_common_subexpressions
from ..passes.fuse_projections import FusedWeights, fuse_projections
from ..passes.fp8_rows import quantize_wide_rows
from ..passes.gelu_epilogues import fuse_gelu_epilogues
from ..passes.schedule import overlap_collectives
from ..passes.split_vector_matmuls import split_vector_matmuls
from ..passes.shared_blocks import share_blocks
from ..passes.shard import ShardSpec, shard
from ..passes.shard_rules import Group
from ..inspect.dump import source_line
from ..inspect.report import Report, collectives_of

log = logging.getLogger("para_fx")

COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class Options:
    """What a para backend was asked to do."""

    mesh: DeviceMesh | None = None
    cache: FirstBlockCache | None = None
    compiler: str = "inductor"
    inductor: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config patches for the Inductor compile
    check_inputs: str | None = None  # "first", "every" or "off" (see para_fx.core.agreement); None: the environment's
    check_timeout: float = 600.0  # seconds a rank waits for the others at an input check
    fuse_projections: bool = False  # sibling projections as one matmul (passes/fuse_projections.py)
    gelu_epilogues: bool = True  # a linear layer's gelu in its matmul's epilogue on CUDA (passes/gelu_epilogues.py)
    wide_fp8_rows: bool = True  # fp8 quantisation of wide gelu rows by para-fx's kernel on CUDA (passes/fp8_rows.py)
    schedule_collectives: bool = False  # independent work moved into transfer windows (passes/schedule.py)
    shared_blocks: bool = False  # each distinct transformer block compiled once (passes/shared_blocks.py)
    split_vector_matmuls: bool = False  # replicated vectors' matmuls split by columns (passes/split_vector_matmuls.py)
    ring_kv: str = "pass"  # how Ring brings the other ranks' keys/values (runtime/attention.py)
    ring_transport: str = "nccl"  # what carries them between GPUs (runtime/attention.py)
    # static graphs this backend compiled, for Dynamo's dynamic graph of the same frame to reuse
    static_graphs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


class ParaBackend:
    """A Dynamo backend: ``(GraphModule, example_inputs) -> callable``.

    ``torch.compile(model, backend=..., mode=..., options=...)`` hands ``mode`` and ``options`` to
    the backend; they configure the Inductor compile of the transformed graph.
    """

    def __init__(self, options: Options):
        self.options = options

    def __call__(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None, options: dict | None = None
    ) -> Callable[..., Any]:
        return compile_graph(gm, list(example_inputs), with_inductor_settings(self.options, mode, options))

    def __repr__(self) -> str:
        return f"para_fx.backend({self.options})"


def backend(
    mesh: DeviceMesh | None = None,
    cache: FirstBlockCache | None = None,
    compiler: str = "inductor",
    *,
    check_inputs: str | None = None,
    check_timeout: float = 600.0,
    fuse_projections: bool = False,
    gelu_epilogues: bool = True,
    wide_fp8_rows: bool = True,
    schedule_collectives: bool = False,
    shared_blocks: bool = False,
    split_vector_matmuls: bool = False,
    ring_kv: str = "pass",
    ring_transport: str = "nccl",
) -> ParaBackend:
    """A para-fx Dynamo backend for ``torch.compile(model, backend=...)``.

    ``mesh``: from :func:`para_fx.init_mesh`; None runs on one device (the cache alone, no
    collectives). ``cache``: a :class:`para_fx.FirstBlockCache`, or None. ``compiler``: "inductor", "aot_eager" or "eager" (the transformed graph run as
    Python, for debugging and fast tests). ``check_inputs``: when ranks compare their inputs
    ("first" call of each graph and shape, "every" call, or "off"; default: the environment
    variable ``PARA_FX_CHECK_INPUTS``, else "first"), waiting at most ``check_timeout`` seconds
    for each other (see :mod:`para_fx.core.agreement`).

    ``gelu_epilogues`` (on): on CUDA, a linear layer followed by a tanh gelu runs as one cuBLASLt
    matmul with the gelu in its epilogue (:mod:`para_fx.passes.gelu_epilogues`). ``wide_fp8_rows``
    (on): on CUDA, the per-row fp8 quantisation (torchao's dynamic fp8) of a ``gelu`` or
    ``cat(x, gelu)`` wider than 4096 runs as one kernel of para-fx's that reads the row once
    (:mod:`para_fx.passes.fp8_rows`).

    Two passes, off by default: on H200s (FLUX, 1024 px) neither made the step faster by more than
    about 1% (README, Benchmarks).
    ``fuse_projections``: the projections that read one activation (queries, keys, values) as one
    matmul, bf16 or fp8, at the cost of one more copy of their weights
    (:mod:`para_fx.passes.fuse_projections`).
    ``schedule_collectives``: work that no transfer needs moved behind each collective's start
    (:mod:`para_fx.passes.schedule`).

    ``ring_kv``: how Ring attention brings the other ranks' keys/values: "pass" them round the
    ring, one block per step while the current one computes (memory for two blocks), or "gather"
    them all at once, each attention one kernel with no merge of partial results (memory for
    every block) (:func:`para_fx.runtime.attention.sharded_attention`). ``ring_transport``: what
    carries the passed blocks between GPUs: "nccl", or "copy_engine" (a ring of 2): the copy
    engines through symmetric memory, leaving every SM to the attention the transfer overlaps.

    ``shared_blocks`` (experimental, off until a GPU run measures it): each transformer block
    becomes a call of one ``invoke_subgraph`` per distinct block, so Inductor compiles FLUX's 57
    blocks as two (:mod:`para_fx.passes.shared_blocks`). Not applied together with ``cache`` yet:
    the cached blocks sit inside the ``torch.cond``.

    ``split_vector_matmuls`` (experimental): the matmuls of replicated vectors (adaLN modulation:
    the conditioning vector against each block's large weight) split by output columns over the
    sequence group, each rank reading its share of those weights, one all-gather joining them
    (:mod:`para_fx.passes.split_vector_matmuls`). Not applied together with ``cache``.
    """
    check_mode(check_inputs)
    if ring_kv not in RING_KV:
        raise ValueError(f"para_fx.backend: ring_kv must be one of {RING_KV}, got {ring_kv!r}")
    if compiler not in COMPILERS:
        raise ValueError(f"para_fx.backend: compiler must be one of {COMPILERS}, got {compiler!r}")
    if mesh is not None:
        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f"para_fx.backend: mesh must be a DeviceMesh from para_fx.init_mesh, got {type(mesh).__name__}")
        check_ring_transport(ring_transport, mesh_info(mesh).ring)  # validates the dims now, not at the first call
    else:
        check_ring_transport(ring_transport, 1)
    if cache is not None and not isinstance(cache, FirstBlockCache):
        raise TypeError(f"para_fx.backend: cache must be a para_fx.FirstBlockCache, got {type(cache).__name__}")
    return ParaBackend(
        Options(
            mesh=mesh, cache=cache, compiler=compiler, check_inputs=check_inputs, check_timeout=check_timeout,
            fuse_projections=fuse_projections, gelu_epilogues=gelu_epilogues, wide_fp8_rows=wide_fp8_rows,
            schedule_collectives=schedule_collectives,
            shared_blocks=shared_blocks, split_vector_matmuls=split_vector_matmuls, ring_kv=ring_kv,
            ring_transport=ring_transport,
        )
    )


_DEFAULT_OPTIONS: list[Options] = []  # one for the process: its compiled graphs are shared by every call


def para(
    gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None, options: dict | None = None
) -> Callable[..., Any]:
    """``backend="para"``: the default mesh (all ranks Ulysses) when distributed, else one device."""
    if not _DEFAULT_OPTIONS:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        _DEFAULT_OPTIONS.append(Options(mesh=init_mesh() if distributed else None))
    return compile_graph(gm, list(example_inputs), with_inductor_settings(_DEFAULT_OPTIONS[0], mode, options))


def with_inductor_settings(options: Options, mode: str | None, settings: dict | None) -> Options:
    """``options`` with torch.compile's ``mode`` / ``options`` turned into Inductor config patches.

    Unknown modes and option names are refused here, at the first compile, rather than ignored.
    """
    if mode is None and not settings:
        return options
    from torch._inductor import config, list_mode_options

    if options.compiler != "inductor":
        raise ValueError(
            f"para_fx: mode={mode!r} / options={settings!r} configure Inductor, but this backend's "
            f"compiler is {options.compiler!r}"
        )
    patches = dict(options.inductor)
    if mode is not None:
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if mode not in modes:
            raise ValueError(f"para_fx: unknown mode {mode!r}; torch.compile's modes are {modes}")
        patches.update(list_mode_options(mode))
    unknown = sorted(set(settings or {}) - set(config._config))
    if unknown:
        raise ValueError(f"para_fx: unknown Inductor options {unknown} (see torch._inductor.list_options())")
    patches.update(settings or {})
    return dataclasses.replace(options, inductor=patches)


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], options: Options) -> Callable[..., Any]:
    _warn_at_recompile_limit()
    scalars = scalar_reads(gm, example_inputs)
    if scalars or _is_dynamic(gm, example_inputs):
        log.info("para_fx: symbolic sizes or inputs read as numbers; compiling one graph per shape and value")
        compiled = _Specialized(gm, options, sorted(scalars), example_inputs)
    else:
        compiled = _compile_static(gm, example_inputs, options)
        options.static_graphs[_static_key(gm, example_inputs)] = compiled
    if options.mesh is None:
        return compiled
    names = [input_name(node) for node in gm.graph.find_nodes(op="placeholder")]
    ranks = options.mesh.mesh.flatten().tolist()
    return with_input_check(compiled, names, ranks, check_mode(options.check_inputs), options.check_timeout)


def _warn_at_recompile_limit() -> None:
    """Dynamo runs a frame eagerly once it has compiled it ``recompile_limit`` times: on a mesh
    that is every rank computing the whole model, correct but no faster. Say so at the last
    compile Dynamo allows, before it happens (with ``dynamic=False`` each new shape is a compile)."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    if compile_id is None or compile_id.frame_compile_id is None or compile_id.frame_compile_id + 1 != limit:
        return
    warnings.warn(
        f"para_fx: graph {compile_id} is the last compile of its frame that torch._dynamo.config.recompile_limit "
        f"({limit}) allows; a further new input shape or guard failure runs the frame eagerly: whole and "
        f"unsharded on every rank, without para's passes. Raise the limit, or compile with dynamic=None "
        f"(para then compiles one static graph per shape itself, with no such limit).",
        stacklevel=2,
    )


def _static_key(gm: fx.GraphModule, inputs: Sequence[Any], skip: Sequence[int] = ()) -> tuple:
    """What identifies a static graph of one frame: the frame, the graph's tensor ops and their
    non-integer literals (sizes differ between Dynamo's static and dynamic graphs of a frame), and
    its inputs' names and metadata, leaving out the size inputs at ``skip``."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    placeholders = [n.name for i, n in enumerate(gm.graph.find_nodes(op="placeholder")) if i not in skip]
    ops = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and isinstance(node.meta.get("example_value"), torch.Tensor):
            literals = [a for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs))
                        if isinstance(a, (float, bool, str, torch.dtype)) or a is None]
            ops.append((node.op, str(node.target), repr(literals)))
    signature = _signature([x for i, x in enumerate(inputs) if i not in skip])
    return compile_id.frame_id if compile_id is not None else None, tuple(ops), tuple(placeholders), signature


def _signature(inputs: Sequence[Any]) -> tuple:
    return tuple(
        (tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else x for x in inputs
    )


def _compile_static(gm: fx.GraphModule, example_inputs: list[Any], options: Options) -> Callable[..., Any]:
    report = Report()
    graph = capture_aten(gm, example_inputs, scalars=scalar_reads(gm, example_inputs))
    subclass_inputs = any(is_traceable_wrapper_subclass(x) for x in example_inputs)
    flat_inputs = flatten_subclasses(example_inputs) if subclass_inputs else example_inputs
    layouts = take_over_weight_guards(gm, example_inputs) if subclass_inputs else {}
    if layouts:
        report.notes.append(
            f"quantized weights: Dynamo's per-call guards inside {len(layouts)} weight(s) replaced by para's "
            "checks (para_fx/core/weight_guards.py)"
        )
    static = static_flags(gm, example_inputs)
    graph = run_passes(graph, flat_inputs, options, report)
    user_inputs = len(flat_inputs)
    fused = None
    groups = fuse_projections(graph, flat_inputs) if options.fuse_projections else []
    if groups:
        fused = FusedWeights(groups, flat_inputs)
        flat_inputs = [*flat_inputs, *fused.tensors]
        static = [*static, *[True] * len(fused.tensors)]  # rebuilt only when a weight changes
        report.fused_projections = [len(g.weights) for g in groups]
        extra = sum(t.numel() * t.element_size() for t in fused.tensors)
        report.notes.append(
            f"projections fused: {sum(report.fused_projections)} matmuls of shared activations as "
            f"{len(groups)}, on one copy of their weights concatenated ({extra / 2**20:.0f} MiB more memory; "
            "backend(fuse_projections=False) keeps them apart)"
        )
        report.add_graph("fuse_projections", graph)
    if options.gelu_epilogues:
        _gelu_epilogues_pass(graph, report)
    if options.wide_fp8_rows:
        _wide_fp8_rows_pass(graph, report)
    layout = None
    if options.cache is not None:
        graph, layout, flat_inputs = _cache_pass(graph, flat_inputs, options, report)
    report.collectives.extend(collectives_of(graph))  # before sharing: a shared subgraph is listed once
    if options.shared_blocks:
        _shared_blocks_pass(graph, report, cached=layout is not None)
    report.graph_count = 1
    if layout is None:
        options = _with_fp8_settings(graph, options, report)
    _wide_rows_note(graph, options, report)
    for recorder in _RECORDERS:
        recorder.extend(report)
    mark_static_inputs(graph, gm, static)
    started = time.perf_counter()
    compiled = _inner_compile(graph, flat_inputs, options)
    # run_passes recorded at least the captured graph; the record is shared with the recorders' reports
    report.compiled[-1].inner_compile_seconds = time.perf_counter() - started
    if fused is not None:
        compiled = fused.calling(compiled, user_inputs)
    if subclass_inputs:
        compiled = _FlattenSubclasses(compiled, example_inputs, layouts, gm)
    if layout is not None:  # outside the flattening: the caller's parameters tell the model
        owner = next((i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)), None)
        compiled = CachedGraph(compiled, layout, options.cache, owner)
    return compiled


class _FlattenSubclasses:
    """Calls a graph captured from tensor-subclass inputs with their inner tensors."""

    def __init__(self, compiled: Callable[..., Any], example_inputs: Sequence[Any], layouts: dict[int, Any], gm: fx.GraphModule):
        self.compiled = compiled
        names = [input_name(node) for node in gm.graph.find_nodes(op="placeholder")]
        self.flatten = SubclassFlattener(example_inputs, LayoutCheck(layouts, names) if layouts else None)

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*self.flatten(args))


# One H200, FLUX with torchao's per-row fp8 (2026-12-01): Inductor splits each row's amax of the
# activations a quantised matmul reads into two kernels and quantises in a third; unsplit, amax and
# quantisation are one kernel: 4.4 ms less kernel time a step (95.2 -> 90.8 ms; README, Benchmarks).
# Not with the cache: its decision is a reduction over the whole residual, which one kernel alone
# would make slower, and the skipped step with fp8 has not been measured so.
FP8_SETTINGS = {"split_reductions": False}


def _scaled_matmuls(graph: fx.GraphModule) -> int:
    return len(graph.graph.find_nodes(op="call_function", target=torch.ops.aten._scaled_mm.default))


def _with_fp8_settings(graph: fx.GraphModule, options: Options, report: Report) -> Options:
    """``options`` with :data:`FP8_SETTINGS` under the user's own, for a graph of fp8 matmuls."""
    fp8 = _scaled_matmuls(graph)
    settings = {k: v for k, v in FP8_SETTINGS.items() if k not in options.inductor}
    if not fp8 or not settings:
        return options
    report.notes.append(
        f"fp8: {fp8} scaled matmul(s); with Inductor the graph compiles with {settings}, so that each row's "
        "amax and its quantisation are one kernel"
    )
    if options.compiler != "inductor":
        return options
    return dataclasses.replace(options, inductor={**options.inductor, **settings})


def _wide_rows_note(graph: fx.GraphModule, options: Options, report: Report) -> None:
    rows = wide_rows(graph) if "inductor_choices_class" not in options.inductor else []
    if rows:
        report.notes.append(
            f"persistent rows: with Inductor on a GPU, {len(rows)} reduction(s) along rows of "
            f"{INDUCTOR_ROW_LIMIT + 1}-{PERSISTENT_ROW_LIMIT} values (layer norms, fp8 row scales) keep the row in "
            f"registers and read it once, the first at "
            f"{source_line(rows[0])}; options={{'inductor_choices_class': None}} keeps Inductor's own limit"
        )


def run_passes(graph: fx.GraphModule, example_inputs: list[Any], options: Options, report: Report) -> fx.GraphModule:
    """The aten graph through the shard passes that apply to this mesh, the helpers each inserts inlined."""
    report.add_graph("captured", graph)
    if _scaled_matmuls(graph):  # elsewhere Inductor merges what repeats inside the kernels it fuses
        merged = merge_common_subexpressions(graph)
        if merged:
            report.notes.append(
                f"fp8: {merged} repeated node(s) merged, each computed once (a quantized layer quantizes its "
                "input itself: sibling projections quantized one activation each)"
            )
            report.add_graph("merge_common_subexpressions", graph)
    if options.mesh is None:
        return graph
    recognized = recognize_attention(graph)
    if recognized:
        report.notes.append(
            f"attention written as matmuls and a softmax, run as scaled_dot_product_attention: {len(recognized)} "
            f"site(s), the first at {recognized[0].source}"
        )
        report.add_graph("recognize_attention", graph)
    info = mesh_info(options.mesh)
    for kind, parts, rank, group in (
        ("batch", info.batch, info.batch_rank, info.batch_group),
        ("seq", info.seq, info.seq_rank, info.seq_group),
    ):
        if parts > 1:
            spec = ShardSpec(kind, Group(parts, rank, group), info, options.ring_kv, options.ring_transport)
            graph = inline_helpers(shard(graph, spec, report), example_inputs)
            report.add_graph(f"shard_{kind}", graph)
            if kind == "seq" and options.split_vector_matmuls:
                _split_vector_matmuls_pass(graph, spec.group, options, report)
    if options.schedule_collectives and overlap_collectives(graph):
        report.add_graph("schedule_collectives", graph)
    return graph


def _split_vector_matmuls_pass(graph: fx.GraphModule, group: Group, options: Options, report: Report) -> None:
    """Skipped with the cache: the pass moves every block's modulation in front of the first block,
    where a skipped step would compute them all."""
    if options.cache is not None:
        report.notes.append("split vector matmuls: not applied with the first block cache (it would run them on skipped steps)")
        return
    split = split_vector_matmuls(graph, group)
    if split is not None:
        report.notes.append(
            f"split vector matmuls: {split.matmuls} matmuls of replicated vectors split by columns over {group.parts} "
            f"ranks, one all-gather; {split.bytes_saved / 2**20:.0f} MiB of weights fewer read per rank and call"
        )
        report.add_graph("split_vector_matmuls", graph)


def _gelu_epilogues_pass(graph: fx.GraphModule, report: Report) -> None:
    fused = fuse_gelu_epilogues(graph)
    if fused:
        report.notes.append(
            f"gelu epilogues: {len(fused)} linear layer(s) and the gelu after each as one matmul "
            f"(aten._addmm_activation, cuBLASLt's epilogue), the first at {fused[0]}; "
            "backend(gelu_epilogues=False) keeps them apart"
        )
        report.add_graph("gelu_epilogues", graph)


def _wide_fp8_rows_pass(graph: fx.GraphModule, report: Report) -> None:
    rewritten = quantize_wide_rows(graph)
    if rewritten:
        report.notes.append(
            f"wide fp8 rows: {len(rewritten)} fp8 matmul input(s) of more than {PERSISTENT_ROW_LIMIT} values a row "
            "(a gelu, or a cat ending in one) quantised by para-fx's kernel (para_fx::quantize_rows: the row read "
            f"once, the gelu inside), the first at {rewritten[0]}; backend(wide_fp8_rows=False) leaves them to Inductor"
        )
        report.add_graph("wide_fp8_rows", graph)


def _cache_pass(graph: fx.GraphModule, example_inputs: list[Any], options: Options, report: Report):
    """The First Block Cache's cond; the graph gains the state inputs the runtime will pass."""
    cache = options.cache
    groups = []
    if options.mesh is not None:
        info = mesh_info(options.mesh)
        groups = [group for parts, group in ((info.seq, info.seq_group), (info.batch, info.batch_group)) if parts > 1]
    cached = insert_first_block_cache(graph, cache.compute_first, cache.compute_last, groups, report)
    if cached is None:
        return graph, None, example_inputs
    graph, layout = cached
    inputs = layout.example_inputs(example_inputs)
    graph = capture_aten(graph, inputs, functional=False)
    report.add_graph("cache", graph)
    return graph, layout, inputs


def _shared_blocks_pass(graph: fx.GraphModule, report: Report, cached: bool) -> None:
    """Each transformer block as a call of its shared subgraph; skipped with the cache for now
    (the cached blocks sit inside the cond's branches, which this pass does not enter)."""
    if cached:
        report.notes.append("shared blocks: not applied with the first block cache (blocks inside its cond)")
    elif share_blocks(graph, report):
        report.add_graph("shared_blocks", graph)


_RECORDERS: list[Report] = []


@contextlib.contextmanager
def recording():
    """Collect the reports of every graph compiled inside the block (used by ``explain``)."""
    report = Report()
    _RECORDERS.append(report)
    try:
        yield report
    finally:
        _RECORDERS.remove(report)


def _inner_compile(graph: fx.GraphModule, example_inputs: list[Any], options: Options) -> Callable[..., Any]:
    if options.compiler == "eager":
        return graph
    if options.compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(graph, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    from .inductor_choices import WideRowReductions, choices_of

    # rows of up to 4096 values reduced in registers (core/inductor_choices.py; README, Design)
    patches = {**overlap_settings(), **HOST_SETTINGS, "inductor_choices_class": WideRowReductions, **options.inductor}
    with _tracing_context(), choices_of(patches):
        return compile_fx(graph, example_inputs, config_patches=patches)


def _tracing_context():
    """Dynamo's tracing context when Dynamo called the backend; otherwise (a shape specialised at
    call time, :class:`_Specialized`) one of our own, with the shape environment that Inductor's
    FX graph cache needs: without it every such compile bypasses the cache, and a new resolution
    is compiled in full again after every restart."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if TracingContext.try_get() is not None:
        return contextlib.nullcontext()
    return tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv())))


# Inductor's wrapper checks every input's size and stride on every call (FLUX: 1000+ inputs, about
# 1 ms of host time a call, a quarter of a skipped cache step on an H200). Dynamo's guards and the
# backend's per-signature dispatch have checked them already. torch.compile(options={"size_asserts":
# True}) turns the checks back on.
HOST_SETTINGS = {"size_asserts": False}

# Inductor's scheduler passes that move each collective's start as early, and its wait as late, as
# the data allows, so all-to-alls and ring transfers run under independent compute.
OVERLAP_PASSES = ("sink_waits", "raise_comms", "reorder_compute_for_overlap")


def overlap_settings() -> dict[str, Any]:
    """Inductor config that turns on communication/computation overlap (off by default in torch).

    The scheduler-level passes exist under these names in torch 2.11 and 2.13; a torch that lacks
    one gets the passes it has, and one without the switch gets nothing (and a log line).
    """
    from torch._inductor import comms, config

    if not hasattr(config, "reorder_for_compute_comm_overlap"):
        log.info("para_fx: this torch's Inductor has no reorder_for_compute_comm_overlap; collectives are not reordered")
        return {}
    passes = [name for name in OVERLAP_PASSES if hasattr(comms, name)]
    return {"reorder_for_compute_comm_overlap": bool(passes), "reorder_for_compute_comm_overlap_passes": passes}


def _is_dynamic(gm: fx.GraphModule, example_inputs: list[Any]) -> bool:
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        return True
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) or (
            isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)
        ):
            return True
    return False


class _Specialized:
    """Compiles and caches one static graph per concrete input shape and per value of the inputs
    the graph reads as numbers.

    The shard pass splits sequences into uneven static chunks; rather than reason about
    symbolic chunk sizes, a graph Dynamo made dynamic is specialised at call time. A shape this
    frame already compiled statically (its first call) reuses that graph, called without the
    size arguments.
    """

    def __init__(self, gm: fx.GraphModule, options: Options, read_inputs: list[int], example_inputs: list[Any]):
        self.gm = gm
        self.options = options
        self.read_inputs = read_inputs
        self.compiled: dict[tuple, Callable[..., Any]] = {}
        self.sizes = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.SymInt)]  # Dynamo's size inputs
        self.frame, self.ops, self.names, _ = _static_key(gm, [], self.sizes)

    def __call__(self, *args: Any) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        key += tuple(args[i].item() for i in self.read_inputs)
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = self._compiled_before(args) or _compile_static(self.gm, list(args), self.options)
        return fn(*args)

    def _compiled_before(self, args: tuple) -> Callable[..., Any] | None:
        if self.read_inputs:
            return None
        if self.frame is None:
            return None
        keep = [i for i in range(len(args)) if i not in self.sizes]
        static = self.options.static_graphs.get((self.frame, self.ops, self.names, _signature([args[i] for i in keep])))
        if static is None:
            return None
        return lambda *call_args: static(*[call_args[i] for i in keep])


def register_para_backend() -> None:
    """Make ``backend="para"`` resolve to :func:`para` on import.

    When Dynamo is already loading the ``torch_dynamo_backends`` entry point (which imports this
    package), it registers the name itself, and registering it here too would be a duplicate.
    """
    from torch._dynamo.backends import registry

    if registry._BACKENDS.get("para") is None and "para" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=para, name="para")
