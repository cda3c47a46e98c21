"""Traceable stand-ins for diffusers attention processors that break Dynamo graphs.

The para backend only parallelises attention that Dynamo puts in a graph. A processor that
loops over samples and selects tokens with data-dependent shapes (``torch.nonzero``) makes Dynamo
run it between graphs: correct, but on full tensors and unsharded. :func:`make_traceable` swaps
such processors, on one model instance, for equivalents with static shapes: one SDPA call over
padded keys with a boolean key mask. The passes never name a model; this table is the only place
that knows processor classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's RoPE: channel pairs (2i, 2i+1) rotated by the per-token angle, computed in fp32."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class MaskedJointAttnProcessor:
    """Mochi's joint (video + text) attention in one masked SDPA call, for every sample at once.

    The stock processor keeps, per sample, only the text tokens its mask marks valid, attends
    over ``[video, valid text]``, and pads the output back with zeros. Here padded text tokens
    stay in place: they are masked out as keys, and their outputs are zeroed. This equals the
    stock processor when each text mask is a prefix (valid tokens first, as a right-padding
    tokenizer makes it, which is what diffusers' Mochi pipeline does); for any other mask the
    stock processor moves valid tokens to the front, which a static-shape program cannot do
    without a gather across shards, so such masks raise an error instead of giving other results.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        heads = attn.heads
        query, key, value = (
            proj(hidden_states).unflatten(2, (heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query, text_key, text_value = (
            proj(encoder_hidden_states).unflatten(2, (heads, -1))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        if image_rotary_emb is not None:
            query = _rotate_pairs(query, *image_rotary_emb)
            key = _rotate_pairs(key, *image_rotary_emb)

        video_len, text_len = query.shape[1], text_query.shape[1]
        text_valid = attention_mask.bool()
        _check_prefix_mask(text_valid)
        # [B, S, H, D] -> [B, H, S, D], video tokens then text tokens
        query, key, value = (
            torch.cat([video, text], dim=1).transpose(1, 2)
            for video, text in ((query, text_query), (key, text_key), (value, text_value))
        )
        video_valid = text_valid.new_ones(text_valid.shape[0], video_len)
        key_valid = torch.cat([video_valid, text_valid], dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_valid[:, None, None, :])
        out = out.transpose(1, 2).flatten(2, 3)
        out = out * key_valid[:, :, None].to(out.dtype)  # padded text queries give zeros, as before
        hidden_states, encoder_hidden_states = out.split_with_sizes((video_len, text_len), dim=1)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _check_prefix_mask(valid: torch.Tensor) -> None:
    """Refuse text masks with a valid token after a padded one (see :class:`MaskedJointAttnProcessor`).

    A mask is a prefix when it never rises from 0 to 1 along the sequence. The check stays in the
    graph as one asynchronous assert, so it costs no host sync and no graph break. On CPU it raises
    a RuntimeError with this message; on CUDA it is a device-side assertion (the message is printed
    and the process's CUDA context is lost), as for any failed device assert.
    """
    rises = valid[:, 1:] & ~valid[:, :-1]
    torch._assert_async(
        ~rises.any(),
        "para_fx: a Mochi text attention mask has a valid token after a padded one; the traceable "
        "attention installed by make_traceable needs right-padded (prefix) masks",
    )


# Processor classes (by name, defined in diffusers) whose calls break Dynamo graphs -> their
# traceable replacement.
TRACEABLE_PROCESSORS: dict[str, type] = {
    "MochiAttnProcessor2_0": MaskedJointAttnProcessor,
}


def make_traceable(model: torch.nn.Module) -> list[str]:
    """Replace, on this instance only, attention processors that break Dynamo graphs.

    Returns the names of the modules changed (empty for models that need nothing). Other
    instances of the same class, and the classes themselves, are untouched.
    """
    changed = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        cls = type(processor)
        replacement = TRACEABLE_PROCESSORS.get(cls.__name__)
        if replacement is not None and cls.__module__.startswith("diffusers."):
            module.processor = replacement()
            changed.append(name)
    return changed
