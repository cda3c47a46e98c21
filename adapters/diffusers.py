"""diffusers pipelines on para-fx, under the names ParaAttention users know.

    torchrun --nproc_per_node=2 run_flux.py

    import torch, torch.distributed as dist
    from diffusers import FluxPipeline
    from para_fx.adapters.diffusers import apply_cache_on_pipe, init_context_parallel_mesh, parallelize_pipe

    dist.init_process_group()
    torch.cuda.set_device(dist.get_rank())
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    mesh = init_context_parallel_mesh(pipe.device.type, max_ring_dim_size=2)
    parallelize_pipe(pipe, mesh=mesh, mode="max-autotune-no-cudagraphs")   # compiles pipe.transformer
    apply_cache_on_pipe(pipe, residual_diff_threshold=0.12)                # First Block Cache
    image = pipe("A cat holding a sign that says hello world", num_inference_steps=28).images[0]
    if dist.get_rank() == 0:
        image.save("flux.png")                # other ranks got latents (they skip the VAE decode)
    dist.destroy_process_group()

Nothing here knows a model: the transformer is compiled with ``para_fx.backend``, which shards
whatever graph Dynamo hands it. The adapter only does what a compiler cannot see: it agrees a
seed across ranks, opens one cache session per pipeline call, names the cache context of each
transformer call after the one diffusers pipelines already announce (``transformer.cache_context
("cond" / "uncond" / "cond_uncond")``), installs traceable attention where a model would break the
graph (:func:`make_traceable`), and lets non-zero ranks skip decoding. Everything is per pipeline
instance: the pipeline's class is left alone (the instance is given a subclass with the same name
whose ``__call__`` goes through the adapter), and the transformer is compiled in place with
``nn.Module.compile``, so ``pipe.transformer`` stays the diffusers model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

import para_fx

from .traceable import make_traceable
from .vae import parallelize_vae

__all__ = [
    "apply_cache_on_pipe",
    "context_parallel_degrees",
    "init_context_parallel_mesh",
    "last_cache_stats",
    "make_traceable",
    "parallelize_pipe",
    "parallelize_vae",
]

# Pipeline attributes that hold a denoiser (Wan 2.2 has a second one for the low-noise steps).
DENOISERS = ("transformer", "transformer_2")


def init_context_parallel_mesh(
    device_type: str | None = None,
    max_batch_dim_size: int | None = None,
    max_ring_dim_size: int | None = None,
    max_ulysses_dim_size: int | None = None,
) -> DeviceMesh | None:
    """A para-fx mesh over the whole world, its degrees chosen within the given limits.

    The batch dim (CFG parallelism: cond and uncond on different ranks) gets the largest divisor
    of the world size up to ``max_batch_dim_size`` (default 1: it only helps pipelines that batch
    cond and uncond in one transformer call). The rest goes to Ulysses as far as
    ``max_ulysses_dim_size`` allows, and what remains to Ring. ``ValueError`` when the limits
    cannot cover the world size. Without a process group (one device) this returns None, which
    :func:`parallelize_pipe` accepts. ``device_type`` None: CUDA unless the process group is gloo.
    """
    batch, ring, ulysses = context_parallel_degrees(
        _world_size(), max_batch_dim_size, max_ring_dim_size, max_ulysses_dim_size
    )
    return para_fx.init_mesh(batch=batch, ring=ring, ulysses=ulysses, device_type=device_type)


def context_parallel_degrees(
    world_size: int,
    max_batch_dim_size: int | None = None,
    max_ring_dim_size: int | None = None,
    max_ulysses_dim_size: int | None = None,
) -> tuple[int, int, int]:
    """``(batch, ring, ulysses)`` for :func:`init_context_parallel_mesh` (see there)."""
    limits = {
        "max_batch_dim_size": max_batch_dim_size,
        "max_ring_dim_size": max_ring_dim_size,
        "max_ulysses_dim_size": max_ulysses_dim_size,
    }
    for name, limit in limits.items():
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"init_context_parallel_mesh: {name} must be None or a positive int, got {limit!r}")
    feasible = [
        (batch, world_size // batch // ulysses, ulysses)
        for batch in _divisors(world_size, max_batch_dim_size or 1)
        for ulysses in _divisors(world_size // batch, max_ulysses_dim_size or world_size)
        if max_ring_dim_size is None or world_size // batch // ulysses <= max_ring_dim_size
    ]
    if not feasible:
        raise ValueError(
            f"init_context_parallel_mesh: no batch x ring x ulysses split of the world size {world_size} "
            f"has batch <= {max_batch_dim_size or 1}, ring <= {max_ring_dim_size} and ulysses <= "
            f"{max_ulysses_dim_size}; raise a limit or run on fewer ranks"
        )
    return max(feasible, key=lambda degrees: (degrees[0], degrees[2]))  # the most batch, then Ulysses


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, min(n, at_most) + 1) if n % d == 0]


def parallelize_pipe(pipe: Any, mesh: DeviceMesh | None = None, *, compiler: str = "inductor", **compile_kwargs: Any) -> Any:
    """Run ``pipe``'s transformer context-parallel over ``mesh``; returns ``pipe``, changed in place.

    ``mesh``: from :func:`init_context_parallel_mesh` or ``para_fx.init_mesh``; None means the
    default mesh (all Ulysses) when torch.distributed is initialised, one device otherwise.
    The transformer is compiled (lazily, at the first call) with ``para_fx.backend(mesh,
    compiler=compiler)``; ``compile_kwargs`` (e.g. ``mode="max-autotune-no-cudagraphs"``) go to
    ``torch.compile``. Do not wrap ``pipe.transformer`` in ``torch.compile`` yourself afterwards.

    Every rank must call the pipeline with the same arguments. Per call: without a
    ``generator``, rank 0 draws a seed and every rank uses it; without an ``output_type``,
    ranks other than 0 return latents (``output_type="latent"``, no VAE decode) unless the VAE
    was parallelised with :func:`parallelize_vae`, in which case every rank decodes and the
    other ranks return tensors (``"pt"``) instead of PIL images. Pass ``output_type`` to have
    the same on every rank.
    """
    if mesh is None and _world_size() > 1:
        mesh = init_context_parallel_mesh()
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"parallelize_pipe: mesh must be a DeviceMesh (init_context_parallel_mesh), got {type(mesh).__name__}")
    para_fx.backend(mesh=mesh, compiler=compiler)  # validates the mesh and compiler now
    state = _adapt(pipe)
    state.parallel = True
    state.mesh = mesh
    state.compiler = compiler
    state.compile_kwargs = dict(compile_kwargs)
    state.settings_version += 1
    state.prepare(pipe)
    return pipe


def apply_cache_on_pipe(
    pipe: Any, residual_diff_threshold: float = 0.08, *, compiler: str | None = None, **cache_kwargs: Any
) -> Any:
    """Enable para-fx's First Block Cache on ``pipe``'s transformer; returns ``pipe``, changed in place.

    ``cache_kwargs`` go to ``para_fx.FirstBlockCache`` (``warmup_steps``,
    ``max_consecutive_skips``, ``compute_first``, ``compute_last``). Each pipeline call is one
    cache session (fresh state), and each transformer call uses the cache context the pipeline
    names (Wan's conditional and unconditional calls keep separate states).
    :func:`last_cache_stats` reports the last call. Works before or after
    :func:`parallelize_pipe`; without it, the transformer runs on one device. ``compiler``, when
    given, replaces the inner compiler (default "inductor", or what :func:`parallelize_pipe`
    set). Calling it again with only a new threshold changes the threshold without recompiling.
    """
    state = _adapt(pipe)
    new = para_fx.FirstBlockCache(threshold=residual_diff_threshold, **cache_kwargs)
    if compiler is not None and compiler != state.compiler:
        para_fx.backend(compiler=compiler)  # validates the name now
        state.compiler = compiler
        state.settings_version += 1
    if state.cache is not None and _structure(state.cache) == _structure(new):
        state.cache.threshold = new.threshold  # read at every call: no recompile
    else:
        state.cache = new
        state.settings_version += 1
    state.prepare(pipe)
    return pipe


def _structure(cache: para_fx.FirstBlockCache) -> dict[str, Any]:
    """The settings of a cache that are compiled into the graph or its runtime (all but the threshold)."""
    return {f.name: getattr(cache, f.name) for f in dataclasses.fields(cache) if f.name != "threshold"}


def last_cache_stats(pipe: Any) -> para_fx.CacheStats:
    """What the First Block Cache did during ``pipe``'s last call: steps, computed, skipped, diffs.

    ``steps`` counts transformer calls (two per step for pipelines that call it for cond and
    uncond separately). Every rank sees the same numbers: skip decisions are all-reduced.
    """
    state = pipe.__dict__.get("_para_fx")
    if state is None or state.cache is None:
        raise ValueError("last_cache_stats: call apply_cache_on_pipe(pipe) first")
    if state.last_stats is None:
        raise ValueError("last_cache_stats: the pipeline has not been called since apply_cache_on_pipe")
    return state.last_stats


@dataclasses.dataclass(eq=False)
class _PipeState:
    """The adapters' settings for one pipeline instance, and what each denoiser was compiled with."""

    parallel: bool = False
    mesh: DeviceMesh | None = None
    compiler: str = "inductor"
    compile_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache: para_fx.FirstBlockCache | None = None
    settings_version: int = 0
    compiled: dict[str, tuple[torch.nn.Module, int]] = dataclasses.field(default_factory=dict)  # name -> (module, version)
    last_stats: para_fx.CacheStats | None = None

    def prepare(self, pipe: Any) -> None:
        """(Re)compile every denoiser whose module or settings changed; compilation itself is lazy."""
        for name in DENOISERS:
            module = getattr(pipe, name, None)
            if module is None:
                continue
            if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
                raise TypeError(
                    f"pipe.{name} was wrapped in torch.compile after para-fx adapted the pipeline: "
                    f"parallelize_pipe / apply_cache_on_pipe compile it already (with the para "
                    f"backend). Remove the torch.compile line and pass its options to "
                    f"parallelize_pipe(pipe, mesh, mode=...) instead."
                )
            done_module, done_version = self.compiled.get(name, (None, -1))
            if done_module is module and done_version == self.settings_version:
                continue
            make_traceable(module)
            if self.cache is not None:
                _name_cache_contexts(module, self)
            backend = para_fx.backend(mesh=self.mesh, cache=self.cache, compiler=self.compiler)
            module.compile(backend=backend, **self.compile_kwargs)
            self.compiled[name] = (module, self.settings_version)

    def call(self, pipe: Any, base_call: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        self.prepare(pipe)
        if self.parallel and _world_size() > 1:
            bound = inspect.signature(base_call).bind_partial(pipe, *args, **kwargs).arguments
            if bound.get("generator") is None:
                kwargs["generator"] = torch.Generator(pipe._execution_device).manual_seed(_agreed_seed())
            if "output_type" not in bound and dist.get_rank() != 0:
                kwargs["output_type"] = "pt" if _has_parallel_vae(pipe) else "latent"
        if self.cache is None:
            return base_call(pipe, *args, **kwargs)
        self.last_stats = None
        with para_fx.cache_session(self.cache):
            out = base_call(pipe, *args, **kwargs)
        self.last_stats = para_fx.cache_stats(self.cache)
        return out


def _adapt(pipe: Any) -> _PipeState:
    """The pipeline's adapter state, giving the instance its adapted subclass on first use."""
    state = pipe.__dict__.get("_para_fx")
    if state is None:
        state = _PipeState()
        pipe.__dict__["_para_fx"] = state
        pipe.__class__ = _adapted_class(type(pipe))
    return state


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    """A subclass of ``cls``, with the same name, whose ``__call__`` runs through the adapter.

    ``pipe(...)`` looks ``__call__`` up on the type, so an instance attribute cannot intercept
    it. Only adapted instances get the subclass: ``cls`` and its other instances are untouched,
    and the name keeps ``save_pretrained`` and reprs as they were.
    """
    adapted = _ADAPTED_CLASSES.get(cls)
    if adapted is None:
        base_call = cls.__call__

        def __call__(self, *args, **kwargs):
            return self.__dict__["_para_fx"].call(self, base_call, args, kwargs)

        __call__.__doc__ = base_call.__doc__
        __call__.__signature__ = inspect.signature(base_call)
        adapted = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _ADAPTED_CLASSES[cls] = adapted
    return adapted


def _name_cache_contexts(module: torch.nn.Module, state: _PipeState) -> None:
    """Make ``module.cache_context(name)`` (which diffusers pipelines open around each
    transformer call) also select the para-fx cache context ``name``, on this instance."""
    if "cache_context" in module.__dict__ or not hasattr(type(module), "cache_context"):
        return
    diffusers_context = type(module).cache_context

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs: Any):
        with contextlib.ExitStack() as stack:
            if state.cache is not None:
                stack.enter_context(para_fx.cache_context(state.cache, name))
            stack.enter_context(diffusers_context(module, name, **kwargs))
            yield

    module.cache_context = cache_context


def _has_parallel_vae(pipe: Any) -> bool:
    """Whether ``parallelize_vae`` split this pipeline's VAE: then every rank must take part in decoding."""
    return getattr(getattr(pipe, "vae", None), "_para_fx_parallel_vae", None) is not None


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agreed_seed() -> int:
    """A seed drawn on rank 0 (from its default generator, so ``torch.manual_seed`` applies) and
    broadcast, so that every rank draws the same initial noise."""
    seed = [int(torch.randint(0, 2**63 - 1, ()).item()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(seed, src=0)
    return seed[0]
