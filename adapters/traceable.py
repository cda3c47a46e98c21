"""Traceable stand-ins for diffusers attention processors that break Dynamo graphs.

The para backend only parallelises attention that Dynamo puts in a graph. A processor that
loops over samples and selects tokens with data-dependent shapes (``torch.nonzero``) makes Dynamo
run it between graphs: correct, but on full tensors and unsharded. :func:`make_traceable` swaps
such processors, on one model instance, for equivalents with static shapes: one SDPA call over
padded keys with a boolean key mask. A processor that masks queries as well as keys swaps the
same way: the rows of its mask follow the tokens para splits, so every block would gather it.
Where the break is in the model's own code rather than in a processor (sequence lengths read back
from a mask, tokens selected by a mask, a Python branch on a tensor's value, a table built lazily
on the first call), it fixes that one instance the same way. The passes never name a model; the
tables at the end of this file are the only place that knows processor and model classes.
"""

from __future__ import annotations

import types
from typing import Any, Callable

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
    if not return_dict:
        return (output,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=output)


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
    if not return_dict:
        return (output,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=output)


def _static_forward_installer(static_forward: Callable) -> Callable[[torch.nn.Module], list[str]]:
    """An installer of ``static_forward`` on one instance, with the stock forward's LoRA scaling around it."""

    def install(model: torch.nn.Module) -> list[str]:
        """Bind the static forward to this instance; nothing if it is bound already."""
        from diffusers.utils import apply_lora_scale

        if getattr(model.forward, "__wrapped__", None) is static_forward:
            return []
        model.forward = types.MethodType(apply_lora_scale("attention_kwargs")(static_forward), model)
        return ["forward"]

    return install


# Processor classes (by name, defined in diffusers) whose calls break Dynamo graphs, or make every
# block gather a mask -> their traceable replacement.
TRACEABLE_PROCESSORS: dict[str, type] = {
    "MochiAttnProcessor2_0": MaskedJointAttnProcessor,
    "HunyuanVideo15AttnProcessor2_0": HunyuanVideo15KeyMaskedAttnProcessor,
}

# Model classes (by name, defined in diffusers) that break Dynamo graphs outside an attention
# processor -> the function that fixes one instance and returns the attribute names it changed.
TRACEABLE_MODELS: dict[str, Callable[[torch.nn.Module], list[str]]] = {
    "Lumina2Transformer2DModel": _static_forward_installer(_lumina2_static_forward),
    "ZImageTransformer2DModel": _build_rope_tables,
    "HunyuanVideo15Transformer3DModel": _static_forward_installer(_hunyuan_video15_static_forward),
    "HunyuanVideoFramepackTransformer3DModel": _static_forward_installer(_framepack_static_forward),
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
