"""Traceable stand-ins for diffusers attention processors that break Dynamo graphs.

The para backend only parallelises attention that Dynamo puts in a graph. A processor that
loops over samples and selects tokens with data-dependent shapes (``torch.nonzero``) makes Dynamo
run it between graphs: correct, but on full tensors and unsharded. :func:`make_traceable` swaps
such processors, on one model instance, for equivalents with static shapes: one SDPA call over
padded keys with a boolean key mask. A processor that masks queries as well as keys swaps the
same way: the rows of its mask follow the tokens para splits, so every block would gather it.
Where the break is in the model's own code rather than in a processor (sequence lengths read back
from a mask, tokens selected by a mask, a Python branch on a tensor's value, a table built lazily
on the first call, a patch grid read back from a tensor, experts run on the tokens routed to them,
an in-place write through a boolean mask),
it fixes that one instance the same way. The passes never name a model; the tables at the end
of this file are the only place that knows processor and model classes.
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F


def _rotate_pairs(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Mochi's and Wan-Animate-2's RoPE: channel pairs (2i, 2i+1) rotated by the per-token angle (the
    complex product of the pair with ``cos + i sin``), computed in ``compute_dtype``."""
    even, odd = x[..., 0::2].to(compute_dtype), x[..., 1::2].to(compute_dtype)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def _model_output(output: Any, return_dict: bool) -> Any:
    """``output`` as the stock forwards return it: a one-tuple, or diffusers' output class."""
    if not return_dict:
        return (output,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=output)


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
        video, text = _joint_projections(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            video[0], video[1] = (_rotate_pairs(x, *image_rotary_emb) for x in video[:2])

        video_len, text_len = video[0].shape[1], text[0].shape[1]
        text_valid = attention_mask.bool()
        _check_prefix_mask(text_valid, "a Mochi text attention mask", "attention")
        video_valid = text_valid.new_ones(text_valid.shape[0], video_len)
        key_valid = torch.cat([video_valid, text_valid], dim=1)
        out = _joint_attention(video, text, key_valid)
        out = out * key_valid[:, :, None].to(out.dtype)  # padded text queries give zeros, as before
        return _joint_outputs(attn, out, video_len, text_len)


class HunyuanVideo15KeyMaskedAttnProcessor:
    """HunyuanVideo 1.5's joint (video + text) attention with a key mask.

    The stock processor pads the text mask with ones up to the joint length and masks queries and
    keys alike ([S, S]): its rows follow the query tokens, which para splits, so every block gathers
    the mask. Here only keys are masked ([1, S]), a mask every rank holds whole. Padded text queries
    then attend to the valid tokens instead of giving zeros; they are never keys, so no valid token,
    and no output, sees the difference. The text is attended as it comes, so every mask is followed.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        video, text = _joint_projections(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            video[0], video[1] = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in video[:2])

        video_len, text_len = video[0].shape[1], text[0].shape[1]
        key_valid = F.pad(attention_mask.bool(), (video_len, 0), value=True)
        return _joint_outputs(attn, _joint_attention(video, text, key_valid), video_len, text_len)


def _joint_outputs(
    attn: torch.nn.Module, out: torch.Tensor, video_len: int, text_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint attention's output ``[B, video + text, C]`` split back into the two streams, each
    through its output projection (the text's where ``attn`` has one)."""
    hidden_states, encoder_hidden_states = out.split_with_sizes((video_len, text_len), dim=1)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if hasattr(attn, "to_add_out"):
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


def _joint_projections(
    attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The video and the text stream's query, key and value, [B, S, H, D], queries and keys
    normalised where ``attn`` has norms for them."""
    video = [proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
    text = [
        proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    ]
    for stream, norms in ((video, (attn.norm_q, attn.norm_k)), (text, (attn.norm_added_q, attn.norm_added_k))):
        for i, norm in enumerate(norms):
            if norm is not None:
                stream[i] = norm(stream[i])
    return video, text


def _joint_attention(video: list[torch.Tensor], text: list[torch.Tensor], key_valid: torch.Tensor) -> torch.Tensor:
    """One SDPA over video then text tokens, keys masked by ``key_valid`` [B, S]: [B, S, H * D]."""
    query, key, value = (torch.cat([v, t], dim=1).transpose(1, 2) for v, t in zip(video, text))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_valid[:, None, None, :])
    return out.transpose(1, 2).flatten(2, 3)


def _check_prefix_mask(valid: torch.Tensor, what: str, stand_in: str) -> None:
    """Refuse text masks with a valid token after a padded one (see :class:`MaskedJointAttnProcessor`,
    :func:`_lumina2_static_forward` and :func:`_framepack_static_forward`).

    A mask is a prefix when it never rises from 0 to 1 along the sequence. The check stays in the
    graph as one asynchronous assert, so it costs no host sync and no graph break. On CPU it raises
    a RuntimeError with this message; on CUDA it is a device-side assertion (the message is printed
    and the process's CUDA context is lost), as for any failed device assert.
    """
    rises = valid[:, 1:] & ~valid[:, :-1]
    torch._assert_async(
        ~rises.any(),
        f"para_fx: {what} has a valid token after a padded one; the traceable {stand_in} installed by "
        "make_traceable needs right-padded (prefix) masks",
    )


def _lumina2_static_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
) -> Any:
    """Lumina2Transformer2DModel.forward with static shapes.

    The stock forward reads each sample's text length back from the mask (``.tolist()``), builds
    RoPE positions and the joint sequence ``[valid text, image, padding]`` in Python loops over
    those lengths, and so breaks the graph three times. Here the joint sequence is ``[all text,
    image]`` for every sample: padded text tokens stay in place, masked out as keys, and each
    token gets the RoPE position the stock code gives it (text token j: (j, 0, 0); image token at
    row r, column c: (text length, r, c)). Attention does not depend on the order of its keys, so
    the image outputs are the stock ones. The stock code takes the *first* ``mask.sum()`` text
    tokens as the valid ones; that equals this program only for prefix masks (what Lumina2's
    pipeline makes: right padding), so other masks raise an error instead of giving other results.
    """
    batch_size, _, height, width = hidden_states.shape
    patch = self.config.patch_size
    rows, cols = height // patch, width // patch
    text_len = encoder_hidden_states.shape[1]

    temb, text = self.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
    text_valid = encoder_attention_mask.bool()
    _check_prefix_mask(text_valid, "a Lumina2 text attention mask", "forward")

    text_count = text_valid.sum(dim=1)
    text_rope, image_rope = _lumina2_rope(self.rope_embedder.freqs_cis, text_valid, text_count, rows, cols)
    joint_rope = torch.cat([text_rope, image_rope], dim=1)

    image = (
        hidden_states.view(batch_size, -1, rows, patch, cols, patch)
        .permute(0, 2, 4, 3, 5, 1)
        .flatten(3)
        .flatten(1, 2)
    )
    image = self.x_embedder(image)

    for layer in self.context_refiner:
        text = layer(text, encoder_attention_mask, text_rope)
    for layer in self.noise_refiner:
        image = layer(image, None, image_rope, temb)

    # padded text tokens are never keys below; zero them so that nothing non-finite reaches the
    # attention (a sample without valid text has every key masked in the context refiner, which
    # some attention kernels answer with NaN)
    text = torch.where(text_valid[..., None], text, 0.0)
    joint = torch.cat([text, image], dim=1)
    # text_valid for a prefix mask, built from a count and positions so that every rank holds all of
    # it: the joint blocks' attention then gathers no mask
    positions = torch.arange(joint.shape[1], device=joint.device)
    key_valid = (positions < text_count[:, None]) | (positions >= text_len)
    for layer in self.layers:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            joint = self._gradient_checkpointing_func(layer, joint, key_valid, joint_rope, temb)
        else:
            joint = layer(joint, key_valid, joint_rope, temb)

    joint = self.norm_out(joint, temb)
    output = (
        joint[:, text_len:]
        .view(batch_size, rows, cols, patch, patch, self.out_channels)
        .permute(0, 5, 1, 3, 2, 4)
        .flatten(4, 5)
        .flatten(2, 3)
    )
    return _model_output(output, return_dict)


def _lumina2_rope(
    tables: list[torch.Tensor], text_valid: torch.Tensor, text_count: torch.Tensor, rows: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE factors of the text and the image tokens at the positions Lumina2 gives them.

    Padded text tokens get zeros, as in the stock code; text and image are gathered apart so that
    neither is cut out of a longer sequence that the ranks hold in shards.
    """
    batch_size, text_len = text_valid.shape
    device = text_valid.device
    positions = torch.arange(text_len, device=device)
    text_ids = torch.stack([positions, torch.zeros_like(positions), torch.zeros_like(positions)], dim=-1)
    text_ids = text_ids.expand(batch_size, -1, -1)
    image_ids = torch.stack(
        torch.broadcast_tensors(
            text_count[:, None, None],
            torch.arange(rows, device=device)[None, :, None],
            torch.arange(cols, device=device)[None, None, :],
        ),
        dim=-1,
    ).flatten(1, 2)
    text_rope, image_rope = (
        torch.cat([table.to(device)[ids[..., axis]] for axis, table in enumerate(tables)], dim=-1)
        for ids in (text_ids, image_ids)
    )
    return text_rope * text_valid[..., None], image_rope


def _build_rope_tables(model: torch.nn.Module) -> list[str]:
    """Build Z-Image's RoPE tables now, with diffusers' own code, on the model's device.

    The stock embedder builds them on its first call, under ``with torch.device("cpu")``, a
    context manager Dynamo cannot enter: the first compiled call breaks into five graphs (and
    every later call would recompile once the tables exist). Built here, the call only indexes them.
    """
    rope = model.rope_embedder
    if rope.freqs_cis is not None:
        return []
    device = next(model.parameters()).device
    tables = rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens, theta=rope.theta)
    rope.freqs_cis = [table.to(device) for table in tables]
    return ["rope_embedder"]


def _hunyuan_video15_static_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    timestep_r: torch.Tensor | None = None,
    encoder_hidden_states_2: torch.Tensor | None = None,
    encoder_attention_mask_2: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
) -> Any:
    """HunyuanVideo15Transformer3DModel.forward with static shapes.

    The stock forward branches in Python on whether every image embedding is zero (text-to-video:
    the image tokens are then masked out), and moves each sample's valid condition tokens (image,
    ByT5 text, MLLM text) in front of the padded ones by boolean indexing in a loop over samples:
    a graph break each. Here that test becomes the image tokens' mask, in the graph, and the condition
    tokens stay where they are, ``[image, ByT5 text, MLLM text]``, with their masks beside them.
    The condition tokens carry no RoPE, so the joint attention sees the same valid tokens, only in
    another order, and gives the stock outputs for any masks: nothing is refused. Padded tokens,
    which the stock code zeroes, keep their values here; they are never keys (see
    :class:`HunyuanVideo15KeyMaskedAttnProcessor`), so no output depends on them, unless one is not
    finite (a masked key still multiplies its value by 0). That happens where a sample has no valid
    MLLM token: the refiner's mean over none is 0/0. Such a sample's MLLM text is zeroed, with a
    test per sample rather than per token: a per-token mask would be split with the tokens, and
    every block would gather it for its attention.
    """
    batch_size, _, num_frames, height, width = hidden_states.shape
    p_t, p = self.config.patch_size_t, self.config.patch_size
    frames, rows, cols = num_frames // p_t, height // p, width // p

    image_rotary_emb = self.rope(hidden_states)
    temb = self.time_embed(timestep, timestep_r=timestep_r)
    hidden_states = self.x_embedder(hidden_states)

    text = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    text = torch.where(encoder_attention_mask.bool().any(dim=1)[:, None, None], text, 0.0)
    text_2 = self.context_embedder_2(encoder_hidden_states_2)
    image = self.image_embedder(image_embeds)
    has_image = (image_embeds != 0).any()  # the stock text-to-video test, over the whole batch
    image_valid = has_image.expand(batch_size, image.shape[1])
    conditions = [
        tokens + self.cond_type_embed(torch.full_like(tokens[:, :, 0], condition_type, dtype=torch.long))
        for tokens, condition_type in ((image, 2), (text_2, 1), (text, 0))
    ]
    encoder_hidden_states = torch.cat(conditions, dim=1)
    encoder_attention_mask = torch.cat(
        [image_valid, encoder_attention_mask_2.bool(), encoder_attention_mask.bool()], dim=1
    )

    for block in self.transformer_blocks:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states, encoder_hidden_states = self._gradient_checkpointing_func(
                block, hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb
            )
        else:
            hidden_states, encoder_hidden_states = block(
                hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb
            )

    hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
    return _video_output(hidden_states, (frames, rows, cols), (p_t, p), return_dict)


def _framepack_static_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    pooled_projections: torch.Tensor,
    image_embeds: torch.Tensor,
    indices_latents: torch.Tensor,
    guidance: torch.Tensor | None = None,
    latents_clean: torch.Tensor | None = None,
    indices_latents_clean: torch.Tensor | None = None,
    latents_history_2x: torch.Tensor | None = None,
    indices_latents_history_2x: torch.Tensor | None = None,
    latents_history_4x: torch.Tensor | None = None,
    indices_latents_history_4x: torch.Tensor | None = None,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
) -> Any:
    """HunyuanVideoFramepackTransformer3DModel.forward with static shapes.

    The stock forward reads each sample's condition length back from the mask: at batch 1 it cuts
    the condition tokens to that length (``.item()``), at larger batches it fills a key mask up to
    it sample by sample; either is a graph break. Here the key mask is built from the length by a
    comparison with positions, for every batch size, as HunyuanVideo's own forward does: padded
    text tokens stay in place, masked out as keys, which leaves the latent outputs as they were.
    Both stock paths take the *first* ``mask.sum()`` condition tokens as the valid ones; that equals
    this program only for prefix text masks (right padding, what the pipeline's tokenizer makes),
    so other masks raise an error instead of giving other results.
    """
    _, _, num_frames, height, width = hidden_states.shape
    p, p_t = self.config.patch_size, self.config.patch_size_t
    frames, rows, cols = num_frames // p_t, height // p, width // p

    def rope(frame_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(frame_indices=frame_indices, height=height, width=width, device=hidden_states.device)

    hidden_states = self.x_embedder(hidden_states)
    history = self.clean_x_embedder(latents_clean, latents_history_2x, latents_history_4x)
    history_indices = (indices_latents_clean, indices_latents_history_2x, indices_latents_history_4x)
    history_rope = [rope(i) if x is not None and i is not None else None for x, i in zip(history, history_indices)]
    hidden_states, image_rotary_emb = self._pack_history_states(
        hidden_states, *history, rope(indices_latents), *history_rope, rows, cols
    )

    temb, _ = self.time_text_embed(timestep, pooled_projections, guidance)
    text = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    image = self.image_projection(image_embeds)
    text_valid = encoder_attention_mask.bool()
    _check_prefix_mask(text_valid, "a Framepack text attention mask", "forward")
    # image tokens before the text, as in the stock code: the valid tokens are then a prefix
    encoder_hidden_states = torch.cat([image, text], dim=1)
    latent_len = hidden_states.shape[1]
    positions = torch.arange(latent_len + encoder_hidden_states.shape[1], device=hidden_states.device)
    valid_len = latent_len + image.shape[1] + text_valid.sum(dim=1)
    attention_mask = (positions < valid_len[:, None])[:, None, None, :]

    for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states, encoder_hidden_states = self._gradient_checkpointing_func(
                block, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb
            )
        else:
            hidden_states, encoder_hidden_states = block(
                hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb
            )

    hidden_states = hidden_states[:, -frames * rows * cols :]
    hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
    return _video_output(hidden_states, (frames, rows, cols), (p_t, p), return_dict)


def _video_output(hidden_states: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int], return_dict: bool) -> Any:
    """Tokens [B, F * H * W, C * pt * p * p] as the stock forwards return them: [B, C, F * pt, H * p, W * p]."""
    (frames, rows, cols), (p_t, p) = grid, patch
    output = (
        hidden_states.reshape(hidden_states.shape[0], frames, rows, cols, -1, p_t, p, p)
        .permute(0, 4, 1, 5, 2, 6, 3, 7)
        .flatten(6, 7)
        .flatten(4, 5)
        .flatten(2, 3)
    )
    return _model_output(output, return_dict)


def _dense_moe_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HiDream's mixture-of-experts feed-forward (``MOEFeedForwardSwiGLU.forward``) with static shapes.

    At inference the stock code sorts the tokens by expert, reads the count per expert back to the
    host (``bincount().cpu()``) and runs each expert on the tokens it was given: a host sync and
    data-dependent shapes, a graph break per block. Here every expert runs on every token and its
    output is weighted by that token's routing weight for it, 0 where the gate did not choose it.
    The gate is the stock one, so the choice of experts is the same; the chosen experts' outputs are
    summed in the same order (by expert index), and the others add exact zeros. The routed experts
    then cost (experts / activated experts) times their stock compute: 2x for HiDream-I1's 4 experts,
    2 active. Training (without the model's ``force_inference_output``) keeps the stock code.
    """
    if self.training and not self._force_inference_output:
        return type(self).forward(self, x)
    topk_idx, topk_weight, _ = self.gate(x)
    tokens = x.reshape(-1, x.shape[-1])
    y = torch.zeros_like(tokens)
    for i, expert in enumerate(self.experts):
        weight = (topk_weight * (topk_idx == i)).sum(dim=-1, keepdim=True)  # the gate picks an expert at most once
        y = y + (expert(tokens) * weight).to(tokens.dtype)
    return y.view(x.shape) + self.shared_experts(x)


def _install_dense_moe(module: torch.nn.Module) -> list[str]:
    """Bind :func:`_dense_moe_forward` to this instance; nothing if it is bound already."""
    if getattr(module.forward, "__func__", None) is _dense_moe_forward:
        return []
    module.forward = types.MethodType(_dense_moe_forward, module)
    return ["forward"]


def _hidream_static_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    timesteps: torch.Tensor = None,
    encoder_hidden_states_t5: torch.Tensor = None,
    encoder_hidden_states_llama3: torch.Tensor = None,
    pooled_embeds: torch.Tensor = None,
    img_ids: torch.Tensor | None = None,
    img_sizes: list[tuple[int, int]] | None = None,
    hidden_states_masks: torch.Tensor | None = None,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
) -> Any:
    """HiDreamImageTransformer2DModel.forward with the patch grid as numbers and the text's RoPE
    positions in the text's own pieces.

    The stock forward keeps the patch grid that its patchify makes as a tensor, and its unpatchify
    reads it back element by element (``.item()``): a graph break per sample, after which the output
    layer ran whole on every rank. Here the grid is known from the latents' shape, a
    ``list[tuple[int, int]]`` as the ``img_sizes`` argument takes it. The stock forward also builds
    the text's RoPE positions (all 0) as one tensor, while the blocks attend over the text as the
    concatenation of its pieces (T5, the last Llama layer, the block's Llama layer): split over the
    ranks piece by piece, the text's queries and keys (rotated) and its values (not) are laid out
    differently, and every attention gathered them. Here the positions are zeros in the same pieces,
    so every rank holds the same tokens of all three. The values are the stock ones; so is the rest.
    """
    if hidden_states_masks is not None and (img_ids is None or img_sizes is None or hidden_states.ndim != 3):
        raise ValueError(
            "if `hidden_states_masks` is passed, `img_ids` and `img_sizes` must also be passed, and `hidden_states` "
            "must be patched: (batch_size, patch_height * patch_width, patch_size * patch_size * channels)"
        )
    batch_size, dtype, dim = hidden_states.shape[0], hidden_states.dtype, self.inner_dim
    if hidden_states_masks is None:
        patch = self.config.patch_size
        img_sizes = [(hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch)] * batch_size
        hidden_states, hidden_states_masks, _, img_ids = self.patchify(hidden_states)
    hidden_states = self.x_embedder(hidden_states)
    temb = self.t_embedder(timesteps, dtype) + self.p_embedder(pooled_embeds)

    # the Llama layers', one per block, then T5's, each projected to the model's width
    llama = [encoder_hidden_states_llama3[k] for k in self.config.llama_layers]
    texts = [proj(x).view(batch_size, -1, dim) for proj, x in zip(self.caption_projection, llama)]
    texts.append(self.caption_projection[-1](encoder_hidden_states_t5).view(batch_size, -1, dim))
    text_pieces = (texts[-1], texts[-2], texts[0])  # the text of every block: T5, last Llama, the block's Llama
    txt_ids = torch.cat([img_ids.new_zeros(batch_size, piece.shape[1], 3) for piece in text_pieces], dim=1)
    image_rotary_emb = self.pe_embedder(torch.cat([img_ids, txt_ids], dim=1))

    def run(block: torch.nn.Module, tokens: torch.Tensor, text: torch.Tensor | None) -> Any:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, tokens, hidden_states_masks, text, temb, image_rotary_emb)
        return block(
            hidden_states=tokens, hidden_states_masks=hidden_states_masks, encoder_hidden_states=text, temb=temb,
            image_rotary_emb=image_rotary_emb,
        )

    block_id = 0
    text = torch.cat([texts[-1], texts[-2]], dim=1)
    text_len = text.shape[1]
    for block in self.double_stream_blocks:
        hidden_states, text = run(block, hidden_states, torch.cat([text, texts[block_id]], dim=1))
        text = text[:, :text_len]
        block_id += 1

    image_len = hidden_states.shape[1]
    hidden_states = torch.cat([hidden_states, text], dim=1)
    joint_len = hidden_states.shape[1]
    if hidden_states_masks is not None:
        hidden_states_masks = F.pad(hidden_states_masks, (0, text_len + texts[0].shape[1]), value=1.0)
    for block in self.single_stream_blocks:
        hidden_states = run(block, torch.cat([hidden_states, texts[block_id]], dim=1), None)[:, :joint_len]
        block_id += 1

    output = self.unpatchify(self.final_layer(hidden_states[:, :image_len], temb), img_sizes, self.training)
    return _model_output(output, return_dict)


class WanAnimate2RotatedAttnProcessor:
    """Wan-Animate-2's self-attention in the reference pass, with RoPE factors made once per forward.

    The stock processor rotates queries and keys sample by sample, reading each sample's patch grid
    back from a tensor (``grid_sizes.tolist()``): two graph breaks in every block, and between them
    the attention ran whole on every rank. With :func:`_wan_animate2_static_forward` the reference
    pass (``kv_cache_mode="extract"``) passes ``rotary_emb`` as every token's ``(cos, sin)``, float64,
    and the rotation is the stock one (a complex product in float64) in real numbers. The cache
    still gets the keys and values before the rotation. Any other call (the generation pass, flex
    attention over a block mask; a complex table from the stock forward) runs the stock code.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        rotary_emb: Any,
        grid_sizes: Any,
        kv_cache: Any,
        kv_cache_mode: str,
        **kwargs: Any,
    ) -> torch.Tensor:
        from diffusers.models.transformers import transformer_wan_animate_2 as stock

        if kv_cache_mode != "extract" or not isinstance(rotary_emb, tuple):
            return stock.WanAnimate2AttnProcessor.__call__(
                self, attn, hidden_states, rotary_emb, grid_sizes, kv_cache, kv_cache_mode, **kwargs
            )
        query, key, value = stock._get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        kv_cache.store(key, value)
        # as the stock code: float64, then float32, then the values' dtype
        query, key = (_rotate_pairs(x.float(), *rotary_emb, torch.float64).type_as(value) for x in (query, key))
        out = stock.dispatch_attention_fn(
            query, key, value, attn_mask=None, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_animate2_static_forward(
    self: torch.nn.Module,
    hidden_states: list[torch.Tensor],
    timestep: torch.Tensor,
    encoder_hidden_states: list[torch.Tensor],
    condition_latents: list[torch.Tensor],
    kv_cache: Any,
    kv_cache_mode: str,
    seq_len: int,
    encoder_hidden_states_image: torch.Tensor | None = None,
    offset_grid_sizes: torch.Tensor | None = None,
    reference_grid_sizes: torch.Tensor | None = None,
    origin_len: int | None = None,
    origin_area: list[int] | None = None,
    is_uncondtion: bool = False,
    return_dict: bool = True,
) -> Any:
    """WanAnimate2Transformer3DModel.forward of the reference pass (``kv_cache_mode="extract"``) with
    the patch grids as numbers and RoPE computed in the graph.

    The stock forward reads a RoPE offset back from ``offset_grid_sizes`` (``.item()``, for each
    ``refer_offset_*`` of -1) to look up a table cached per offset, keeps the patch grids as a
    tensor that the attention processor and the unpatchify read back (``.tolist()``): graph breaks
    before, inside and after every block. Here the grids are the patch embeddings' shapes, the offset
    stays a tensor, and every token's angle is its position (plus the offset) times the stock
    frequencies, computed as the stock table computes it, so the factors are the stock ones; the
    blocks' attention takes them through :class:`WanAnimate2RotatedAttnProcessor`. The generation
    pass (``"cached"``) runs the stock forward.
    """
    if kv_cache_mode != "extract":
        return type(self).forward(
            self, hidden_states, timestep, encoder_hidden_states, condition_latents, kv_cache, kv_cache_mode,
            seq_len, encoder_hidden_states_image, offset_grid_sizes, reference_grid_sizes, origin_len, origin_area,
            is_uncondtion, return_dict,
        )
    embedded = [self.patch_embedding(torch.cat([u, v])[None]) for u, v in zip(hidden_states, condition_latents)]
    grids = [tuple(u.shape[2:]) for u in embedded]
    tokens = [u.flatten(2).transpose(1, 2) for u in embedded]
    if any(u.shape[1] != seq_len for u in tokens):
        lengths = [u.shape[1] for u in tokens]
        raise ValueError(f"Each sample must hold exactly `seq_len` ({seq_len}) tokens, got {lengths}.")
    hidden_states = torch.cat(tokens)
    rotary_emb = _wan_animate2_rope(self, grids, offset_grid_sizes)

    temb = self.time_embedding(
        self.timesteps_proj(timestep * 0 + 1).to(dtype=next(self.time_embedding.parameters()).dtype)
    )  # the reference pass is modulated at timestep 1
    timestep_proj = self.time_projection(temb).unflatten(1, (6, self.config.dim))
    text_len = self.config.text_len
    text = torch.stack([torch.cat([u, u.new_zeros(text_len - u.shape[0], u.shape[1])]) for u in encoder_hidden_states])
    text = self.text_embedding(text)
    image = self.img_emb(encoder_hidden_states_image) if self.config.use_img_emb else None
    block_kwargs = dict(
        temb=timestep_proj, encoder_hidden_states=text, encoder_hidden_states_image=image, kv_cache_mode="extract",
        rotary_emb=rotary_emb, grid_sizes=torch.tensor(grids, dtype=torch.long),  # the grids, for the signature only
    )
    for idx, block in enumerate(self.blocks):
        if is_uncondtion and idx == 9:  # as the stock forward
            continue
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states = self._gradient_checkpointing_func(
                block, hidden_states, kv_cache=kv_cache.get(idx), **block_kwargs
            )
        else:
            hidden_states = block(hidden_states, kv_cache=kv_cache.get(idx), **block_kwargs)

    hidden_states = self.head(hidden_states, temb)
    channels, patch = self.config.out_dim, self.config.patch_size
    output = [
        u[: math.prod(grid)]
        .view(*grid, *patch, channels)
        .permute(6, 0, 3, 1, 4, 2, 5)
        .reshape(channels, *(n * p for n, p in zip(grid, patch)))
        .float()
        for u, grid in zip(hidden_states, grids)
    ]
    return _model_output(output, return_dict)


def _wan_animate2_rope(
    model: torch.nn.Module, grids: list[tuple[int, int, int]], reference_grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's RoPE factors ``(cos, sin)`` in the reference pass, float64, [B, S, 1, head_dim / 2]
    ([1, ...] when every sample has the same grid).

    The stock table for an axis of ``n`` channels holds, in row ``j``, the angles ``(j + offset) *
    10000 ** (-2i / n)``; a reference token at (t, h, w) takes row ``t * refer_stride`` of the time
    table, ``h`` and ``w`` of the others. An offset of -1 is that axis's size in ``reference_grid``,
    (the first sample's, as in the stock code), which stays a tensor here.
    """
    config = model.config
    device = model.patch_embedding.weight.device
    head_dim = config.dim // config.num_heads
    axis_dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    offsets = (config.refer_offset_t, config.refer_offset_h, config.refer_offset_w)
    offsets = [reference_grid[0, axis].to(device) if offset < 0 else offset for axis, offset in enumerate(offsets)]
    strides = (config.refer_stride, 1, 1)
    angles = []
    for grid in grids[:1] if len(set(grids)) == 1 else grids:
        per_axis = []
        for size, dim, offset, stride in zip(grid, axis_dims, offsets, strides):
            frequencies = 1.0 / torch.pow(10000, torch.arange(0, dim, 2, device=device).to(torch.float64).div(dim))
            positions = torch.arange(size, device=device) * stride + offset
            per_axis.append(positions.to(torch.float64)[:, None] * frequencies)
        frames, rows, cols = grid
        per_axis = [
            axis.view(shape).expand(frames, rows, cols, -1)
            for axis, shape in zip(per_axis, ((frames, 1, 1, -1), (1, rows, 1, -1), (1, 1, cols, -1)))
        ]
        angles.append(torch.cat(per_axis, dim=-1).reshape(frames * rows * cols, 1, -1))
    angles = torch.stack(angles)
    return angles.cos(), angles.sin()


def _omnigen_static_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    timestep: Any,
    input_ids: torch.Tensor,
    input_img_latents: list[torch.Tensor],
    input_image_sizes: dict[int, list[int]],
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    return_dict: bool = True,
) -> Any:
    """OmniGenTransformer2DModel.forward with RoPE's choice of scaling factors in the graph, and the
    RoPE factors made in the sequence's own pieces.

    The stock RoPE picks the long or the short scaling factors with a Python ``if`` on a tensor (the
    largest position + 1 above ``original_max_position_embeddings``): a data-dependent branch, which
    broke the model into four graphs. Here the choice is a ``torch.where`` between the two (see
    :func:`_omnigen_rope`). The blocks attend over the concatenation ``[condition tokens, time token,
    image tokens]``, which the ranks split piece by piece, while ``position_ids`` comes as one tensor:
    its factors, split as one sequence, were laid out differently from the queries, and every
    attention gathered them. Here the positions are cut into the same pieces first. The values are
    the stock ones; so is the rest of the forward.
    """
    batch_size, _, height, width = hidden_states.shape
    p = self.config.patch_size

    hidden_states = self.patch_embedding(hidden_states, is_input_image=False)
    image_len = hidden_states.shape[1]
    timestep_proj = self.time_proj(timestep).type_as(hidden_states)
    time_token = self.time_token(timestep_proj).unsqueeze(1)
    temb = self.t_embedder(timestep_proj)

    condition_tokens = self._get_multimodal_embeddings(input_ids, input_img_latents, input_image_sizes)
    pieces = [time_token, hidden_states] if condition_tokens is None else [condition_tokens, time_token, hidden_states]
    hidden_states = torch.cat(pieces, dim=1)
    position_ids = position_ids.view(-1, hidden_states.shape[1]).long()

    if attention_mask is not None and attention_mask.dim() == 3:
        attention_mask = ((1 - attention_mask) * torch.finfo(hidden_states.dtype).min).unsqueeze(1)
        attention_mask = attention_mask.type_as(hidden_states)
    image_rotary_emb = _omnigen_rope(self.rope, hidden_states, position_ids, [piece.shape[1] for piece in pieces])

    for block in self.layers:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states = self._gradient_checkpointing_func(block, hidden_states, attention_mask, image_rotary_emb)
        else:
            hidden_states = block(hidden_states, attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)

    hidden_states = self.norm(hidden_states)[:, -image_len:]
    hidden_states = self.proj_out(self.norm_out(hidden_states, temb=temb))
    hidden_states = hidden_states.reshape(batch_size, height // p, width // p, p, p, -1)
    output = hidden_states.permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)
    return _model_output(output, return_dict)


def _omnigen_rope(
    rope: torch.nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor, lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE factors ``(cos, sin)`` of ``OmniGenSuScaledRotaryEmbedding`` [S, head_dim], computed
    for the pieces of ``lengths`` apart and concatenated.

    The scaling factors are the long ones where the largest position + 1 is above
    ``original_max_position_embeddings`` (over all pieces and samples, as the stock test), chosen by
    ``torch.where`` instead of a Python ``if``. The rest follows the stock ops in the stock order
    (the first sample's positions for all, in float32, without autocast), so the factors are the
    stock ones. The stock module also stores its frequencies (``inv_freq``), which nothing reads
    before its next call overwrites them; here they stay local.
    """
    device = hidden_states.device
    long_factors, short_factors = (
        torch.tensor(factors, dtype=torch.float32, device=device) for factors in (rope.long_factor, rope.short_factor)
    )
    use_long = position_ids.max() + 1 > rope.original_max_position_embeddings
    exponents = torch.arange(0, rope.dim, 2, dtype=torch.int64, device=device).float() / rope.dim
    inv_freq = 1.0 / (torch.where(use_long, long_factors, short_factors) * rope.base**exponents)
    inv_freq = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    scale = rope.max_position_embeddings / rope.original_max_position_embeddings
    scaling_factor = 1.0
    if scale > 1.0:
        scaling_factor = math.sqrt(1 + math.log(scale) / math.log(rope.original_max_position_embeddings))
    device_type = device.type if device.type != "mps" else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        freqs = [(inv_freq @ piece[:, None, :].float()).transpose(1, 2) for piece in position_ids.split(lengths, dim=1)]
        emb = torch.cat([torch.cat((f, f), dim=-1)[0] for f in freqs])
        return emb.cos() * scaling_factor, emb.sin() * scaling_factor


def _glm_image_static_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    prior_token_id: torch.Tensor,
    prior_token_drop: torch.Tensor,
    timestep: torch.Tensor,
    target_size: torch.Tensor,
    crop_coords: torch.Tensor,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
    attention_mask: torch.Tensor | None = None,
    kv_caches: Any = None,
    image_rotary_emb: Any = None,
) -> Any:
    """GlmImageTransformer2DModel.forward with the dropped prior tokens zeroed by a mask.

    The stock forward zeroes the embeddings of the dropped prior tokens in place through a boolean
    index (``prior_embedding[prior_token_drop] *= 0.0``), whose shape depends on the mask's values
    (``nonzero``): a graph break, and the graph before it (the projections of the latents, the text
    and the prior tokens) held no attention, so it ran whole on every rank. Here the same product by
    0.0 is selected with ``torch.where`` (the kept embeddings untouched), which gives the stock values.
    The stock code takes an integer ``prior_token_drop`` as indices of rows, not as a mask: anything
    but a boolean one is refused. The rest is the stock forward.
    """
    if prior_token_drop.dtype != torch.bool:
        raise ValueError(
            f"para_fx: the traceable GlmImage forward installed by make_traceable needs a boolean `prior_token_drop`, "
            f"got {prior_token_drop.dtype}"
        )
    batch_size, _, height, width = hidden_states.shape
    if image_rotary_emb is None:
        image_rotary_emb = self.rope(hidden_states)
    p = self.config.patch_size

    hidden_states = self.image_projector(hidden_states)
    encoder_hidden_states = self.glyph_projector(encoder_hidden_states)
    prior_embedding = self.prior_token_embedding(prior_token_id)
    drop = prior_token_drop.reshape(*prior_token_drop.shape, *[1] * (prior_embedding.ndim - prior_token_drop.ndim))
    prior_embedding = torch.where(drop, prior_embedding * 0.0, prior_embedding)
    hidden_states = hidden_states + self.prior_projector(prior_embedding)
    temb = self.time_condition_embed(timestep, target_size, crop_coords, hidden_states.dtype)

    for idx, block in enumerate(self.transformer_blocks):
        block_args = (temb, image_rotary_emb, attention_mask, attention_kwargs)
        kv_cache = kv_caches[idx] if kv_caches is not None else None
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states, encoder_hidden_states = self._gradient_checkpointing_func(
                block, hidden_states, encoder_hidden_states, *block_args, kv_cache
            )
        else:
            hidden_states, encoder_hidden_states = block(
                hidden_states, encoder_hidden_states, *block_args, kv_cache=kv_cache
            )

    hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
    hidden_states = hidden_states.reshape(batch_size, height // p, width // p, -1, p, p)
    output = hidden_states.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)
    return _model_output(output, return_dict)


def _static_forward_installer(
    static_forward: Callable, lora_kwargs: str | None = "attention_kwargs"
) -> Callable[[torch.nn.Module], list[str]]:
    """An installer of ``static_forward`` on one instance, with the stock forward's LoRA scaling around
    it (the scale read from the argument ``lora_kwargs``; None for a forward without LoRA scaling)."""

    def install(model: torch.nn.Module) -> list[str]:
        """Bind the static forward to this instance; nothing if it is bound already."""
        from diffusers.utils import apply_lora_scale

        bound = getattr(model.forward, "__func__", None)
        if static_forward in (bound, getattr(bound, "__wrapped__", None)):
            return []
        forward = static_forward if lora_kwargs is None else apply_lora_scale(lora_kwargs)(static_forward)
        model.forward = types.MethodType(forward, model)
        return ["forward"]

    return install


# Processor classes (by name, defined in diffusers) whose calls break Dynamo graphs, or make every
# block gather a mask -> their traceable replacement.
TRACEABLE_PROCESSORS: dict[str, type] = {
    "MochiAttnProcessor2_0": MaskedJointAttnProcessor,
    "HunyuanVideo15AttnProcessor2_0": HunyuanVideo15KeyMaskedAttnProcessor,
    "WanAnimate2AttnProcessor": WanAnimate2RotatedAttnProcessor,
}

# Model classes, and classes of their submodules (by name, defined in diffusers), that break Dynamo
# graphs outside an attention processor -> the function that fixes one instance and returns the
# attribute names it changed.
TRACEABLE_MODELS: dict[str, Callable[[torch.nn.Module], list[str]]] = {
    "Lumina2Transformer2DModel": _static_forward_installer(_lumina2_static_forward),
    "ZImageTransformer2DModel": _build_rope_tables,
    "HunyuanVideo15Transformer3DModel": _static_forward_installer(_hunyuan_video15_static_forward),
    "HunyuanVideoFramepackTransformer3DModel": _static_forward_installer(_framepack_static_forward),
    "MOEFeedForwardSwiGLU": _install_dense_moe,
    "HiDreamImageTransformer2DModel": _static_forward_installer(_hidream_static_forward),
    "WanAnimate2Transformer3DModel": _static_forward_installer(_wan_animate2_static_forward, lora_kwargs=None),
    "OmniGenTransformer2DModel": _static_forward_installer(_omnigen_static_forward, lora_kwargs=None),
    "GlmImageTransformer2DModel": _static_forward_installer(_glm_image_static_forward, lora_kwargs=None),
}


def make_traceable(model: torch.nn.Module) -> list[str]:
    """Replace, on this instance only, what breaks Dynamo graphs: attention processors, and the
    model-level code of the classes in :data:`TRACEABLE_MODELS`.

    Returns the names of the modules changed, or for a model-level fix ``module.attribute``
    (``"forward"``, ``"rope_embedder"`` for the model itself); empty for models that need nothing
    and on a second call. Other instances of the same class, and the classes themselves, are
    untouched.
    """
    changed = []
    for name, module in model.named_modules():
        if _from_diffusers(type(module)) and type(module).__name__ in TRACEABLE_MODELS:
            fixed = TRACEABLE_MODELS[type(module).__name__](module)
            changed += [f"{name}.{attribute}" if name else attribute for attribute in fixed]
        processor = getattr(module, "processor", None)
        replacement = TRACEABLE_PROCESSORS.get(type(processor).__name__)
        if replacement is not None and _from_diffusers(type(processor)):
            module.processor = replacement()
            changed.append(name)
    return changed


def _from_diffusers(cls: type) -> bool:
    return cls.__module__.startswith("diffusers.")
