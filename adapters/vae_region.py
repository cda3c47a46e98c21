"""Run a VAE's layers exactly on height chunks: the parallel region behind ``parallelize_vae``.

Inside a region every image/video activation is split along its height (dim -2 of a
channels-first 4-D or 5-D tensor) into contiguous, possibly uneven chunks, chunk r on rank r.
Pointwise layers, channel mixing and upsampling by whole factors are exact on such chunks as
they are. The layers that mix rows are made exact by a torch-function mode that sees every call:

- convolution: each rank receives from the other ranks the rows its window needs (a halo,
  kernel/stride/dilation aware, one ``all_to_all``), pads only at the global borders, and keeps
  the outputs whose window centre lies in its rows, so strided convs stay exact for any split.
  A stride-1 conv that keeps the height runs on the chunk as it is and recomputes only the rows
  next to an inner border, so it copies no input;
- ``F.pad``: pads the height only at the global top (rank 0) and bottom (last rank);
- group norm: every rank's per-group count, mean and M2 combined in float64 (Chan's formula);
- attention: key/value all-gathered over the ranks when the tokens are spatial, left alone when
  the sequence is time at one pixel; which one applies is set by the module that calls it;
- nearest interpolation: checked to scale the height by a whole factor; other row-mixing ops
  raise, so an unsupported layer is an error, never a silently wrong image.

Collectives need every rank's chunk size. A rank reads them once per (layer, input geometry)
with one small all-gather and caches them: repeated calls (per-frame video decoding) then run
without any host synchronisation beyond the data exchanges themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SPATIAL = "spatial"  # attention over the tokens of an image or a frame: keys/values are gathered
LOCAL = "local"  # attention whose sequence does not contain the height: nothing to exchange


def height_dim(x: torch.Tensor) -> int:
    """The split dimension of a channels-first image or video activation."""
    return x.ndim - 2


@dataclasses.dataclass
class Region:
    """One parallel call of an encoder or decoder: the group, this rank, and cached geometry."""

    group: dist.ProcessGroup
    rank: int
    world: int
    geometry: dict  # (site, occurrence) -> every rank's chunk size, shared by calls of one signature
    occurrences: dict = dataclasses.field(default_factory=dict)
    attention: list = dataclasses.field(default_factory=list)  # stack of (policy, module id, [calls])
    suspended: int = 0  # > 0 while a module runs replicated on full tensors

    def sizes(self, site: Any, local: int, device: torch.device) -> list[int]:
        """Every rank's size along the split dim at this call site (all-gathered once, then cached)."""
        occurrence = self.occurrences.get(site, 0)
        self.occurrences[site] = occurrence + 1
        key = (site, occurrence)
        cached = self.geometry.get(key)
        if cached is None:
            mine = torch.tensor([local], dtype=torch.int64, device=device)
            parts = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(parts, mine, group=self.group)
            cached = self.geometry[key] = torch.cat(parts).tolist()
        if cached[self.rank] != local:
            raise RuntimeError(
                f"parallel VAE: a layer saw {local} rows on rank {self.rank} where an earlier call with "
                f"the same input shape saw {cached[self.rank]}; the model changes resolution per call, "
                "which the split does not support"
            )
        if min(cached) == 0:
            raise RuntimeError(
                f"parallel VAE: the split left a rank without rows (chunk sizes {cached}); "
                "use a larger input or fewer ranks"
            )
        return cached

    @contextlib.contextmanager
    def replicated(self) -> Iterator[None]:
        """Run plain single-device code (on gathered, full tensors) inside the region."""
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1


def offsets(sizes: list[int]) -> list[int]:
    """Where each chunk starts, then the total."""
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return out


def all_gather_rows(x: torch.Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """The full tensor, contiguous, from every rank's chunk along ``dim`` (chunks may be uneven)."""
    longest = max(sizes)
    moved = x.movedim(dim, 0)
    if moved.shape[0] < longest:
        moved = torch.cat([moved, moved.new_zeros(longest - moved.shape[0], *moved.shape[1:])])
    moved = moved.contiguous()
    parts = [torch.empty_like(moved) for _ in sizes]
    dist.all_gather(parts, moved, group=group)
    shape = list(x.shape)
    shape[dim] = sum(sizes)
    full = x.new_empty(shape)
    for start, part, size in zip(offsets(sizes), parts, sizes):
        full.narrow(dim, start, size).copy_(part[:size].movedim(0, dim))
    return full


def _exchange_rows(
    x: torch.Tensor, dim: int, send: list[tuple[int, int]], recv: list[int], group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Send rows ``[start, stop)`` of ``x`` to each rank; return the rows received from each rank."""
    moved = x.movedim(dim, 0)
    pieces = [moved[start:stop] for start, stop in send]
    payload = torch.cat(pieces).contiguous()
    received = moved.new_empty(sum(recv), *moved.shape[1:])
    dist.all_to_all_single(received, payload, recv, [stop - start for start, stop in send], group=group)
    return [part.movedim(0, dim) for part in received.split(recv)]


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _padding_pair(padding: Any, kernel: int, dilation: int, index: int) -> tuple[int, int]:
    """(before, after) padding of one spatial dim of a conv's ``padding`` argument."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = dilation * (kernel - 1)
        return total // 2, total - total // 2
    value = padding if isinstance(padding, int) else padding[index]
    return value, value


def _conv_windows(sizes: list[int], kernel: int, step: int, spread: int, top: int) -> list[tuple[int, int]]:
    """Per rank, the input rows ``[lo, hi)`` its outputs read (outside ``[0, length)``: zero padding).

    Output o reads rows ``o*step - top + spread*j`` for j < kernel, and belongs to the rank that
    holds its window centre: every output has one owner, in rank order, whatever the split.
    """
    starts, length = offsets(sizes), sum(sizes)
    reach = spread * (kernel - 1)
    outputs = (length + 2 * top - reach - 1) // step + 1
    centre = spread * ((kernel - 1) // 2)
    firsts = [0] + [min(outputs, max(0, _ceil_div(start + top - centre, step))) for start in starts[1:-1]]
    firsts.append(outputs)
    if any(b <= a for a, b in zip(firsts, firsts[1:])):
        raise RuntimeError(
            f"parallel VAE: a strided conv leaves a rank without output rows (input chunks {sizes}); "
            "use a larger input or fewer ranks"
        )
    return [(a * step - top, (b - 1) * step - top + reach + 1) for a, b in zip(firsts, firsts[1:])]


def _fetch(region: Region, x: torch.Tensor, dim: int, sizes: list[int], windows: list[tuple[int, int]]) -> list:
    """Per rank q, the rows of q's chunk inside this rank's window (None for none, and for itself).

    Every rank r asks for global rows ``windows[r]``; one all-to-all moves them (none if no rank
    needs another's rows).
    """
    starts, ranks, me = offsets(sizes), range(region.world), region.rank
    held = lambda window, q: (max(window[0], starts[q]), min(window[1], starts[q + 1]))  # noqa: E731
    if not any(held(windows[r], q)[0] < held(windows[r], q)[1] for r in ranks for q in ranks if q != r):
        return [None] * region.world
    send = []
    for r in ranks:
        lo, hi = held(windows[r], me)
        send.append((lo - starts[me], hi - starts[me]) if r != me and lo < hi else (0, 0))
    recv = []
    for q in ranks:
        lo, hi = held(windows[me], q)
        recv.append(hi - lo if q != me and lo < hi else 0)
    received = _exchange_rows(x, dim, send, recv, region.group)
    return [part if size else None for part, size in zip(received, recv)]


def _window(region: Region, x: torch.Tensor, dim: int, sizes: list[int], windows: list[tuple[int, int]]) -> torch.Tensor:
    """This rank's rows ``windows[rank]`` of the global tensor, as one tensor, zeros outside it."""
    received = _fetch(region, x, dim, sizes, windows)
    starts, length, me = offsets(sizes), sum(sizes), region.rank
    lo, hi = windows[me]
    pieces = [x.new_zeros(*x.shape[:dim], -lo, *x.shape[dim + 1 :])] if lo < 0 else []
    for q, part in enumerate(received):
        if q == me:
            a, b = max(lo, starts[me]), min(hi, starts[me + 1])
            pieces.append(x.narrow(dim, a - starts[me], b - a))
        elif part is not None:
            pieces.append(part)
    if hi > length:
        pieces.append(x.new_zeros(*x.shape[:dim], hi - length, *x.shape[dim + 1 :]))
    return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]


def _same_conv(region: Region, func: Callable, bound: dict, dim: int, sizes: list[int], halo: int, unpadded: tuple) -> torch.Tensor:
    """A stride-1 conv that keeps the height, without copying the input into a window.

    The conv runs on the chunk with its own zero padding, exact except the ``halo`` rows next to
    an inner border; those are recomputed from the neighbours' rows and written in place.
    """
    x, me, last = bound["input"], region.rank, region.world - 1
    starts, rows = offsets(sizes), sizes[region.rank]
    windows = [(start - halo * (r > 0), stop + halo * (r < last)) for r, (start, stop) in enumerate(zip(starts, starts[1:]))]
    received = _fetch(region, x, dim, sizes, windows)
    out = func(**bound)
    border = lambda pieces: func(**{**bound, "input": torch.cat(pieces, dim), "padding": unpadded})  # noqa: E731
    if me > 0:
        above = [part for part in received[:me] if part is not None]
        out.narrow(dim, 0, halo).copy_(border(above + [x.narrow(dim, 0, 2 * halo)]))
    if me < last:
        below = [part for part in received[me + 1 :] if part is not None]
        out.narrow(dim, rows - halo, halo).copy_(border([x.narrow(dim, rows - 2 * halo, 2 * halo)] + below))
    return out


def _halo_conv(region: Region, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    bound = _bind(func, args, kwargs)
    x, weight = bound["input"], bound["weight"]
    spatial = weight.ndim - 2
    dim, axis = height_dim(x), spatial - 2  # the height in the input, and among the spatial dims
    as_tuple = lambda v: (v,) * spatial if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, dilation = as_tuple(bound.get("stride", 1)), as_tuple(bound.get("dilation", 1))
    padding = bound.get("padding", 0)
    pads = [_padding_pair(padding, weight.shape[2 + i], dilation[i], i) for i in range(spatial)]
    if any(before != after for before, after in pads):
        raise NotImplementedError(f"parallel VAE: asymmetric conv padding {padding!r} is not supported")
    kernel, step, spread, top = weight.shape[-2], stride[axis], dilation[axis], pads[axis][0]
    if kernel == 1 and step == 1 and top == 0:
        return func(*args, **kwargs)  # no row mixing: every rank's chunk maps to itself
    sizes = region.sizes(("conv", id(weight)), x.shape[dim], x.device)
    unpadded = tuple(0 if i == axis else before for i, (before, _) in enumerate(pads))
    if step == 1 and kernel % 2 and 2 * top == spread * (kernel - 1) and min(sizes) >= 2 * top:
        return _same_conv(region, func, bound, dim, sizes, top, unpadded)
    bound["input"] = _window(region, x, dim, sizes, _conv_windows(sizes, kernel, step, spread, top))
    bound["padding"] = unpadded
    return func(**bound)


def _border_pad(region: Region, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    bound = _bind(func, args, kwargs)
    x, pad, mode = bound["input"], list(bound["pad"]), bound.get("mode", "constant")
    if len(pad) < 4 or (pad[2] == 0 and pad[3] == 0):
        return func(*args, **kwargs)
    if x.ndim not in (4, 5):
        raise NotImplementedError(f"parallel VAE: padding dim -2 of a {x.ndim}-D tensor (its split dim is unknown)")
    if pad[2] < 0 or pad[3] < 0:
        raise NotImplementedError("parallel VAE: cropping the height with a negative pad is not supported")
    if mode == "circular":
        raise NotImplementedError("parallel VAE: circular padding of the height is not supported")
    if mode == "reflect" and x.shape[-2] <= max(pad[2], pad[3]):
        raise NotImplementedError("parallel VAE: reflect padding needs more rows per rank than the pad width")
    if region.rank != 0:
        pad[2] = 0
    if region.rank != region.world - 1:
        pad[3] = 0
    bound["pad"] = pad
    return func(**bound)


def _group_norm(region: Region, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """Statistics of every rank combined, then the normalisation; a few groups at a time in float32.

    Working in float32 on an eighth of the groups at a time keeps the extra memory of a
    half/bfloat16 input near a quarter of it, with the precision of the fused kernel.
    """
    bound = _bind(func, args, kwargs)
    x, groups, eps = bound["input"].contiguous(), bound["num_groups"], bound.get("eps", 1e-5)
    weight, bias = bound.get("weight"), bound.get("bias")
    batch, channels = x.shape[:2]
    by_group = x.view(batch, groups, channels // groups, -1)
    step = max(1, groups // 8)
    stats = [torch.var_mean(part.float(), dim=(2, 3), correction=0) for part in by_group.split(step, dim=1)]
    var, mean = (torch.cat(parts, 1).double() for parts in zip(*stats))  # [batch, groups]
    count = x.numel() // (batch * groups)
    local = torch.stack([torch.full_like(mean, count), mean, var * count])
    parts = [torch.empty_like(local) for _ in range(region.world)]
    dist.all_gather(parts, local, group=region.group)
    counts, means, m2s = torch.stack(parts).unbind(1)  # each [world, batch, groups]
    total = counts.sum(0)
    global_mean = (counts * means).sum(0) / total
    global_var = (m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)) / total
    shift, scale = global_mean.float()[..., None, None], torch.rsqrt(global_var + eps).float()[..., None, None]
    affine = [None if p is None else p.float().view(groups, channels // groups, 1) for p in (weight, bias)]
    out = torch.empty_like(x)
    out_by_group = out.view(batch, groups, channels // groups, -1)
    for start in range(0, groups, step):
        span = slice(start, start + step)
        part = (by_group[:, span].float() - shift[:, span]).mul_(scale[:, span])
        if affine[0] is not None:
            part.mul_(affine[0][span])
        if affine[1] is not None:
            part.add_(affine[1][span])
        out_by_group[:, span] = part
    return out


def _nearest_interpolate(region: Region, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    out = func(*args, **kwargs)
    bound = _bind(func, args, kwargs)
    x, mode = bound["input"], bound.get("mode", "nearest")
    rows_in, rows_out = x.shape[-2], out.shape[-2]
    if x.ndim >= 4 and rows_in != rows_out and (mode not in ("nearest", "nearest-exact") or rows_out % rows_in):
        raise NotImplementedError(
            f"parallel VAE: interpolate(mode={mode!r}) from {rows_in} to {rows_out} rows mixes rows across "
            "ranks; only nearest upsampling by a whole factor is exact on chunks"
        )
    if x.ndim == 3 and out.shape[-1] != x.shape[-1]:
        raise NotImplementedError("parallel VAE: interpolating a 3-D tensor (its split dim is unknown)")
    return out


def _attention(region: Region, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    if not region.attention:
        raise NotImplementedError(
            "parallel VAE: scaled_dot_product_attention called by a module whose token layout is unknown; "
            "add its class to the token-layout table in para_fx.adapters.vae"
        )
    policy, site, calls = region.attention[-1]
    calls[0] += 1
    if policy == LOCAL:
        return func(*args, **kwargs)
    bound = _bind(func, args, kwargs)
    if bound.get("attn_mask") is not None or bound.get("is_causal", False):
        raise NotImplementedError("parallel VAE: a masked or causal attention over spatial tokens is not supported")
    key, value = bound["key"], bound["value"]
    sizes = region.sizes(("attention", site), key.shape[-2], key.device)
    bound["key"] = all_gather_rows(key, key.ndim - 2, sizes, region.group)
    bound["value"] = all_gather_rows(value, value.ndim - 2, sizes, region.group)
    return func(**bound)


def _refuse(region: Region, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    raise NotImplementedError(
        f"parallel VAE: {getattr(func, '__name__', func)} mixes rows across the height split and has no "
        "exact chunked form here; decode on one device (do not call parallelize_vae) for this model"
    )


_SIGNATURES: dict = {}


def _bind(func: Callable, args: tuple, kwargs: dict) -> dict:
    """Arguments by name (torch builtins have no Python signature: a table gives their names)."""
    names = _SIGNATURES[func]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _python_parameters(func: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(func).parameters)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_HANDLERS: dict = {}
for _func, _names, _handler in [
    (F.conv2d, _CONV_ARGS, _halo_conv),
    (F.conv3d, _CONV_ARGS, _halo_conv),
    (F.pad, _python_parameters(F.pad), _border_pad),
    (torch._C._nn.pad, ("input", "pad", "mode", "value"), _border_pad),
    (F.group_norm, _python_parameters(F.group_norm), _group_norm),
    (torch.group_norm, ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"), _group_norm),
    (F.interpolate, _python_parameters(F.interpolate), _nearest_interpolate),
    (
        F.scaled_dot_product_attention,
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        _attention,
    ),
]:
    _SIGNATURES[_func] = _names
    _HANDLERS[_func] = _handler
for _func in (
    F.conv1d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.avg_pool2d, F.avg_pool3d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.unfold, F.fold, F.pixel_unshuffle, F.grid_sample,
):  # fmt: skip
    _HANDLERS[_func] = _refuse


class RegionMode(TorchFunctionMode):
    """Routes the row-mixing torch functions of a region to their exact chunked forms."""

    def __init__(self, region: Region):
        super().__init__()
        self.region = region

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None or self.region.suspended:
            return func(*args, **kwargs)
        return handler(self.region, func, args, kwargs)
