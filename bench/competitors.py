"""The First Block Caches we compare with: ParaAttention's (the ``para-attn`` wheel) and diffusers'
own hook, applied to a FluxTransformer2DModel, each with a counter of its skip decisions so a
benchmark can prove which kind of step it timed."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch


class DecisionCounter:
    """How many steps a cache computed and skipped."""

    def __init__(self):
        self.computed = 0
        self.skipped = 0

    def reset(self) -> None:
        self.computed = self.skipped = 0

    def record(self, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
        else:
            self.computed += 1

    def as_dict(self) -> dict:
        return {"computed": self.computed, "skipped": self.skipped}


class ConcatStreamSingleBlock(torch.nn.Module):
    """A diffusers >= 0.35 FluxSingleTransformerBlock, which takes the text and image streams
    separately, called the way para-attn 0.3.38 calls single blocks: one concatenated
    ``[text; image]`` stream in, one out. Costs a split and a concat per block."""

    def __init__(self, block: torch.nn.Module, text_len: int):
        super().__init__()
        self.block = block
        self.text_len = text_len

    def forward(self, hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text, image = hidden_states[:, : self.text_len], hidden_states[:, self.text_len :]
        text, image = self.block(image, text, temb, image_rotary_emb, joint_attention_kwargs)
        return torch.cat([text, image], dim=1)


def apply_paraattention_cache(model: torch.nn.Module, text_len: int) -> DecisionCounter:
    """ParaAttention's First Block Cache on ``model`` in place; run calls inside
    :func:`paraattention_session`."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
    from para_attn.first_block_cache import utils
    from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_transformer

    if "encoder_hidden_states" in inspect.signature(FluxSingleTransformerBlock.forward).parameters:
        model.single_transformer_blocks = torch.nn.ModuleList(
            ConcatStreamSingleBlock(block, text_len) for block in model.single_transformer_blocks
        )
    counter = DecisionCounter()
    decide = utils.get_can_use_cache

    @torch.compiler.disable
    def counted_decision(*args, **kwargs):
        can_use = decide(*args, **kwargs)
        counter.record(can_use)
        return can_use

    utils.get_can_use_cache = counted_decision  # looked up as a module global at each call
    apply_cache_on_transformer(model)
    return counter


@contextlib.contextmanager
def paraattention_session(threshold: float) -> Iterator[None]:
    """A fresh ParaAttention cache state (one generation) at ``threshold``."""
    from para_attn.first_block_cache import utils

    with utils.cache_context(utils.create_cache_context(residual_diff_threshold=threshold)):
        yield


def apply_diffusers_cache(model: torch.nn.Module, threshold: float) -> tuple[DecisionCounter, object]:
    """diffusers' FirstBlockCache hook on ``model`` in place; returns the counter and the head
    hook (whose ``threshold`` may be changed). Run calls inside ``model.cache_context(name)``."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
    head = next(
        hook
        for block in model.modules()
        if (registry := getattr(block, "_diffusers_hook", None)) is not None
        for hook in registry.hooks.values()
        if type(hook).__name__ == "FBCHeadBlockHook"
    )
    counter = DecisionCounter()
    decide = head._should_compute_remaining_blocks

    @torch.compiler.disable
    def counted_decision(residual):
        should_compute = decide(residual)
        counter.record(not should_compute)
        return should_compute

    head._should_compute_remaining_blocks = counted_decision
    return counter, head


def parallelize_with_paraattention(model: torch.nn.Module, mesh) -> None:
    """ParaAttention's context parallelism on ``model`` in place. diffusers >= 0.35 passes
    ``enable_gqa=False`` to SDPA, which para-attn 0.3.38's attention functions do not accept: the
    mode drops it (and refuses a real GQA call)."""
    from para_attn.context_parallel.diffusers_adapters import parallelize_transformer
    from para_attn.para_attn_interface import UnifiedAttnMode

    call = UnifiedAttnMode._call_unified_attn_func
    if not getattr(call, "drops_enable_gqa", False):

        def call_without_enable_gqa(self, *args, enable_gqa=False, **kwargs):
            if enable_gqa:
                raise NotImplementedError("para-attn 0.3.38 has no grouped-query attention")
            return call(self, *args, **kwargs)

        call_without_enable_gqa.drops_enable_gqa = True
        UnifiedAttnMode._call_unified_attn_func = call_without_enable_gqa
    parallelize_transformer(model, mesh=mesh)
