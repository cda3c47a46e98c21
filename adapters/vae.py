"""``parallelize_vae``: exact spatially parallel encode and decode for diffusers VAEs.

A VAE decode is the memory peak of an image or video pipeline once the transformer is parallel.
``parallelize_vae(vae)`` splits the work by height over the ranks, on one VAE instance: the
instance's ``encoder`` and ``decoder`` take the full input on every rank, keep rank r's chunk
of rows (uneven chunks allowed), run every layer exactly on it (see ``vae_region``: halo
exchange for convolutions, global group-norm statistics, gathered keys/values for spatial
attention) and all-gather the output, so every rank returns what one device would and pipelines
work unchanged. Splitting only the height leaves time untouched, so causal temporal convs and
the frame caches of video VAEs (Wan's ``feat_cache``, CogVideoX and Mochi's ``conv_cache``)
work as they are: each rank caches its own rows.

Encoder inputs are split on multiples of the encoder's total height stride, so every
downsampling step stays balanced and patch-style ops see whole patches. An input too small to
give every rank a chunk is decoded on each rank alone, with a warning. Diffusers' spatial
tiling is switched off during a parallel call (the split already bounds memory, and tiles blend
approximately); slicing and frame-wise decoding are exact and left as configured.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..core.mesh import chunk_sizes
from .vae_region import LOCAL, SPATIAL, Region, RegionMode, all_gather_rows, height_dim

logger = logging.getLogger(__name__)

# Model-specific facts, by class name: what a module's type cannot tell. The mechanism itself
# only looks at module types (convs, group norms, attention) and tensor shapes.
TOKEN_LAYOUTS = {
    "WanAttentionBlock": SPATIAL,  # SDPA over the h*w tokens of one frame
    "MochiDownBlock3D": LOCAL,  # attention over the frames of one pixel
    "MochiMidBlock3D": LOCAL,
}
REPLICATED_BLOCKS = {
    # attention over t*h*w tokens with a frame-causal mask built from the local sizes: the block
    # runs on the gathered latent (its resnets and attention are at latent resolution) and each
    # rank keeps its rows
    "HunyuanVideoMidBlock3D",
}
SIZE_CHUNKED_CONVS = {
    # splits its conv over time by the *local* input size, so ranks could disagree on the number
    # of conv calls; inside a region it runs as the plain conv (the split already divides its input)
    "CogVideoXSafeConv3d",
}

_ACTIVE: contextvars.ContextVar[Region | None] = contextvars.ContextVar("para_fx_vae_region", default=None)


@dataclasses.dataclass
class _ParallelVae:
    """What one parallelised VAE instance needs across calls."""

    group: dist.ProcessGroup
    rank: int
    world: int
    geometry: dict = dataclasses.field(default_factory=dict)  # call signature -> cached chunk sizes
    warned: set = dataclasses.field(default_factory=set)

    def warn_once(self, reason: str, message: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            logger.warning(message)


def parallelize_vae(vae: nn.Module, mesh: DeviceMesh | dist.ProcessGroup | None = None) -> nn.Module:
    """Make ``vae.encode`` / ``vae.decode`` split the work by height over the ranks; returns ``vae``.

    ``mesh``: a device mesh over the whole world (e.g. ``para_fx.init_mesh(...)``; all its ranks
    take part, whatever its dims), a process group, or None for the default world group. Every
    rank must call encode/decode with the same input. A no-op without a process group or with
    one rank. Inference only (the exchanges are not differentiable). Calling it again rebinds the
    group.
    """
    group = _resolve_group(mesh)
    if group is None:
        return vae
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("parallelize_vae: this rank is not a member of the given process group")
    state = getattr(vae, "_para_fx_parallel_vae", None)
    if state is not None:
        state.group, state.rank, state.world = group, rank, world
        state.geometry.clear()
        return vae
    if world == 1:
        return vae
    state = vae._para_fx_parallel_vae = _ParallelVae(group, rank, world)
    for name, method in (("decode", "decoder"), ("encode", "encoder")):
        if getattr(vae, method, None) is not None and hasattr(vae, name):
            _wrap(vae, name, _untiled(vae, state, getattr(vae, name)))
    for part in ("decoder", "encoder"):
        module = getattr(vae, part, None)
        if isinstance(module, nn.Module):
            align = _height_stride(module) if part == "encoder" else 1  # decoders only grow chunks
            _wrap(module, "forward", _entry(module, state, align))
            _instrument(module)
    return vae


def _resolve_group(mesh: Any) -> dist.ProcessGroup | None:
    initialised = dist.is_available() and dist.is_initialized()
    if mesh is None:
        return dist.group.WORLD if initialised and dist.get_world_size() > 1 else None
    if not initialised:
        raise RuntimeError(
            "parallelize_vae: a mesh was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first (or pass mesh=None for one device)"
        )
    if isinstance(mesh, dist.ProcessGroup):
        return mesh
    if isinstance(mesh, DeviceMesh):
        if mesh.size() != dist.get_world_size():
            raise ValueError(
                f"parallelize_vae: the mesh has {mesh.size()} ranks but the world has {dist.get_world_size()}; "
                "every rank decodes the same latents, so pass a mesh over the whole world (or mesh=None)"
            )
        return dist.group.WORLD
    raise TypeError(f"parallelize_vae: mesh must be a DeviceMesh, a ProcessGroup or None, got {type(mesh).__name__}")


def _wrap(obj: Any, name: str, replacement: Callable) -> None:
    """Shadow ``obj.name`` on this instance only (classes stay untouched)."""
    setattr(obj, name, replacement)


def _height_stride(encoder: nn.Module) -> int:
    """The product of the height strides of the encoder's convs: its total downsampling factor."""
    factor = 1
    for module in encoder.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            factor *= module.stride[-2]
    return factor


def _split_sizes(rows: int, world: int, align: int) -> list[int] | None:
    """Chunk sizes in rows, on multiples of ``align`` (the remainder goes last), or None if too small."""
    units = rows // align
    if units < world:
        return None
    sizes = [count * align for count in chunk_sizes(units, world)]
    sizes[-1] += rows - units * align
    return sizes


def _untiled(vae: nn.Module, state: _ParallelVae, method: Callable) -> Callable:
    @functools.wraps(method)
    def call(*args, **kwargs):
        if not getattr(vae, "use_tiling", False):
            return method(*args, **kwargs)
        state.warn_once(
            "tiling",
            "parallelize_vae: VAE tiling is ignored while decoding in parallel; each rank works on 1/N "
            "of the rows and the result equals the untiled decode",
        )
        vae.use_tiling = False
        try:
            return method(*args, **kwargs)
        finally:
            vae.use_tiling = True

    return call


def _entry(module: nn.Module, state: _ParallelVae, align: int) -> Callable:
    """The encoder/decoder forward: split the input, run in a region, gather the output."""
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        sample = args[0] if args else None
        if _ACTIVE.get() is not None or not isinstance(sample, torch.Tensor) or sample.ndim not in (4, 5):
            return original(*args, **kwargs)
        rows = sample.shape[-2]
        sizes = _split_sizes(rows, state.world, align)
        if sizes is None:
            state.warn_once(
                f"small-{rows}-{align}",
                f"parallelize_vae: an input of {rows} rows cannot give each of {state.world} ranks "
                f"{align if align > 1 else 'a'} row{'s' if align > 1 else ''}; running on every rank alone",
            )
            return original(*args, **kwargs)
        start = sum(sizes[: state.rank])

        def local(value):
            if isinstance(value, torch.Tensor) and value.ndim in (4, 5) and value.shape[-2] == rows:
                return value.narrow(height_dim(value), start, sizes[state.rank])
            return value

        signature = (id(module),) + tuple(
            tuple(v.shape) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)
        )
        region = Region(state.group, state.rank, state.world, state.geometry.setdefault(signature, {}))
        token = _ACTIVE.set(region)
        try:
            with RegionMode(region):
                out = original(*(local(a) for a in args), **{k: local(v) for k, v in kwargs.items()})
        finally:
            _ACTIVE.reset(token)
        return _gather_outputs(region, out, ("output", id(module)))

    return forward


def _gather_outputs(region: Region, out: Any, site: Any) -> Any:
    """Full tensors from the chunked image/video outputs; caches and other values pass through."""

    def full(value):
        if not isinstance(value, torch.Tensor) or value.ndim not in (4, 5):
            return value
        dim = height_dim(value)
        sizes = region.sizes(site, value.shape[dim], value.device)
        return all_gather_rows(value, dim, sizes, region.group)

    return tuple(full(v) for v in out) if isinstance(out, tuple) else full(out)


def _instrument(root: nn.Module) -> None:
    """Per-instance wrappers for the modules whose behaviour on chunks needs a decision."""
    from diffusers.models.attention_processor import Attention

    for module in root.modules():
        name = type(module).__name__
        if name in REPLICATED_BLOCKS:
            _wrap(module, "forward", _replicated(module, module.forward))
        elif name in TOKEN_LAYOUTS:
            _wrap(module, "forward", _with_token_layout(module, module.forward, _fixed_layout(TOKEN_LAYOUTS[name])))
        elif isinstance(module, Attention):
            _wrap(module, "forward", _with_token_layout(module, module.forward, _diffusers_attention_layout))
        elif name in SIZE_CHUNKED_CONVS:
            _wrap(module, "forward", _plain_conv_in_region(module, module.forward))


def _fixed_layout(policy: str) -> Callable[..., str]:
    return lambda *args, **kwargs: policy


def _diffusers_attention_layout(hidden_states=None, *args, **kwargs) -> str | None:
    """A 4-D input is an image whose h*w tokens the processor flattens; else the caller decides."""
    if hidden_states is None:
        hidden_states = kwargs.get("hidden_states")
    return SPATIAL if isinstance(hidden_states, torch.Tensor) and hidden_states.ndim == 4 else None


def _with_token_layout(module: nn.Module, original: Callable, layout: Callable[..., str | None]) -> Callable:
    @functools.wraps(original)
    def forward(*args, **kwargs):
        region = _ACTIVE.get()
        policy = layout(*args, **kwargs) if region is not None and not region.suspended else None
        if policy is None:
            return original(*args, **kwargs)
        calls = [0]
        region.attention.append((policy, id(module), calls))
        try:
            out = original(*args, **kwargs)
        finally:
            region.attention.pop()
        if policy == SPATIAL and calls[0] == 0:
            raise RuntimeError(
                f"parallel VAE: {type(module).__name__} computed attention without "
                "F.scaled_dot_product_attention (e.g. a non-SDPA attention processor), which the "
                "split cannot make exact; use an SDPA processor (AttnProcessor2_0)"
            )
        return out

    return forward


def _replicated(module: nn.Module, original: Callable) -> Callable:
    """Gather the block's input rows, run it whole, keep this rank's rows of its output."""

    @functools.wraps(original)
    def forward(*args, **kwargs):
        region = _ACTIVE.get()
        sample = args[0] if args else None
        if region is None or region.suspended or not isinstance(sample, torch.Tensor):
            return original(*args, **kwargs)
        dim = height_dim(sample)
        sizes = region.sizes(("replicated", id(module)), sample.shape[dim], sample.device)
        start, rows = sum(sizes[: region.rank]), sum(sizes)

        def full(value):
            if isinstance(value, torch.Tensor) and value.ndim == sample.ndim and value.shape[dim] == sample.shape[dim]:
                return all_gather_rows(value, dim, sizes, region.group)
            return value

        def mine(value):
            if isinstance(value, torch.Tensor) and value.ndim == sample.ndim and value.shape[dim] == rows:
                return value.narrow(dim, start, sizes[region.rank])
            return value

        with region.replicated():
            out = original(*(full(a) for a in args), **{k: full(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(mine(v) for v in out)
        if not (isinstance(out, torch.Tensor) and out.ndim == sample.ndim and out.shape[dim] == rows):
            raise RuntimeError(f"parallel VAE: {type(module).__name__} changed the height; it cannot run replicated")
        return mine(out)

    return forward


def _plain_conv_in_region(module: nn.Module, original: Callable) -> Callable:
    plain = next(base.forward for base in type(module).__mro__ if base.__module__.startswith("torch.nn.modules"))

    @functools.wraps(original)
    def forward(x):
        return plain(module, x) if _ACTIVE.get() is not None else original(x)

    return forward
