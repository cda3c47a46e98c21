"""parallelize_vae on 2 and 4 gloo ranks: tiny random diffusers VAEs against one process.

Each VAE and each refused case is a case of the one spawn per world size (tests/ranks.py), so a
case that fails fails its own tests only. Latent and image heights do not divide by the world
size, so chunks are uneven.
"""

import functools
import logging

import pytest
import torch
from torch import nn

import ranks

TOLERANCE = 1e-4


def tiny_vae(kind: str) -> nn.Module:
    """A small randomly initialised VAE of the real diffusers class (seeded: equal on every rank)."""
    import diffusers

    torch.manual_seed(0)
    if kind == "kl":
        vae = diffusers.AutoencoderKL(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        )  # fmt: skip
    elif kind == "hunyuan_video":
        vae = diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
            norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4,
        )  # fmt: skip
    elif kind == "wan":
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 2], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )  # fmt: skip
    elif kind == "wan2.2":  # residual blocks with pixel-shuffle shortcuts, patchified input
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )  # fmt: skip
    elif kind == "cogvideox":
        vae = diffusers.AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
            block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
        )  # fmt: skip
    elif kind == "mochi":  # its group norms have 32 groups
        vae = diffusers.AutoencoderKLMochi(
            latent_channels=4, encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
            layers_per_block=(1, 1, 1), temporal_expansions=(2,), spatial_expansions=(2,),
            add_attention_block=(False, True, True),
        )  # fmt: skip
    return vae.eval()


# kind -> (image or video to encode, latent to decode); heights 7 and 22 split unevenly over 2 and 4
CASES = {
    "kl": ((1, 3, 22, 10), (2, 4, 7, 6)),
    "hunyuan_video": ((1, 3, 5, 22, 12), (1, 4, 6, 7, 5)),  # 6 latent frames: frame-wise decoding
    "wan": ((1, 3, 5, 22, 12), (1, 4, 3, 7, 5)),  # frame-by-frame with the feature cache
    "wan2.2": ((1, 3, 5, 32, 16), (1, 4, 3, 7, 5)),
    "cogvideox": ((1, 3, 5, 22, 12), (1, 4, 5, 7, 5)),  # 5 latent frames: two batches, conv cache
    "mochi": ((1, 3, 5, 22, 12), (1, 4, 3, 7, 5)),
}


def make_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    inputs = {kind: (torch.randn(image, generator=g), torch.randn(latent, generator=g)) for kind, (image, latent) in CASES.items()}
    inputs["zoo"] = torch.randn(1, 4, 61, 9, generator=g)
    return inputs


def encode_decode(vae: nn.Module, image: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return vae.encode(image).latent_dist.mean, vae.decode(latent).sample


def first_conv_rows(module: nn.Module) -> list[int]:
    """Records the heights that the module's first conv sees (to check that inputs were split)."""
    conv = next(m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    seen = []
    conv.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2]))
    return seen


class Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float("inf") if a.shape != b.shape else (a - b).abs().max().item()


@functools.cache
def inputs_and_references() -> tuple[dict, dict]:
    """Single-process inputs and outputs, made once in the parent and sent to the ranks."""
    inputs = make_inputs()
    references = {kind: encode_decode(tiny_vae(kind), *inputs[kind]) for kind in CASES}
    with torch.no_grad():
        references["one_row"] = tiny_vae("kl").decode(inputs["kl"][1][:, :, :1]).sample
        references["zoo"] = conv_zoo()(inputs["zoo"])
    return inputs, references


def world_mesh():
    import torch.distributed as dist

    import para_fx

    return para_fx.init_mesh(ulysses=dist.get_world_size())


def parallel_encode_decode(kind: str, prepared: tuple[dict, dict]) -> dict:
    """On each rank: errors against the single-process encode and decode, and the rows the first convs saw."""
    from para_fx.adapters.vae import parallelize_vae

    (image, latent), references = prepared[0][kind], prepared[1][kind]
    vae = tiny_vae(kind)
    parallelize_vae(vae, world_mesh() if kind == "kl" else None)
    encoder_rows, decoder_rows = first_conv_rows(vae.encoder), first_conv_rows(vae.decoder)
    encoded, decoded = encode_decode(vae, image, latent)
    return {
        "encode": max_error(encoded, references[0]),
        "decode": max_error(decoded, references[1]),
        "encoder_rows": max(encoder_rows),
        "decoder_rows": max(decoder_rows),
    }


def logged_decode(case: str, prepared: tuple[dict, dict]) -> tuple[float, list[str]]:
    """On each rank: the error of a decode that para-fx adapts with a warning, and the warnings:
    a latent of one row (too small to split) or a VAE with tiling enabled."""
    from para_fx.adapters.vae import parallelize_vae

    inputs, references = prepared
    tiled = case == "tiled"
    latent, reference = (inputs["kl"][1], references["kl"][1]) if tiled else (inputs["kl"][1][:, :, :1], references["one_row"])
    messages = Messages()
    logger = logging.getLogger("para_fx.adapters.vae")
    logger.addHandler(messages)
    try:
        vae = tiny_vae("kl")
        parallelize_vae(vae)
        if tiled:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = 8, 4
        with torch.no_grad():
            return max_error(vae.decode(latent).sample, reference), messages.records
    finally:
        logger.removeHandler(messages)


def raised(fn, *args) -> tuple[str, str] | None:
    """On each rank: the type and message of the error ``fn(*args)`` raises (None: it raised nothing)."""
    try:
        fn(*args)
    except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
        return type(error).__name__, str(error)
    return None


def sub_mesh_parallel():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from para_fx.adapters.vae import parallelize_vae

    sub_mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("a", "b"))["a"]
    parallelize_vae(tiny_vae("kl"), sub_mesh)


def conv_zoo() -> nn.Module:
    """Row-mixing layers beyond the VAEs': strides that do not divide the chunks, dilation, pad modes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.GroupNorm(2, 8),
        nn.Conv2d(8, 8, 5, padding=4, dilation=2),  # halo 4: in place at world 2, a window at 4 (7-row chunk)
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate"),
        nn.Upsample(scale_factor=3, mode="nearest"),
        nn.Conv2d(8, 8, 4, stride=3),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 2, stride=2),
        nn.Conv2d(8, 4, (1, 3), padding=(0, 1)),
    ).eval()


def conv_zoo_error(prepared: tuple[dict, dict]) -> float:
    from para_fx.adapters.vae import parallelize_vae

    latent, reference = prepared[0]["zoo"], prepared[1]["zoo"]
    vae = nn.Module()
    vae.decoder = conv_zoo()
    parallelize_vae(vae)
    with torch.no_grad():
        return max_error(vae.decoder(latent), reference)


def decode_with_default_processor(prepared):
    from para_fx.adapters.vae import parallelize_vae

    latent = prepared[0]["kl"][1]
    vae = tiny_vae("kl")
    vae.set_default_attn_processor()  # attention by baddbmm + softmax, not SDPA
    parallelize_vae(vae)
    with torch.no_grad():
        vae.decode(latent)


def decode_bilinear(prepared):
    from para_fx.adapters.vae import parallelize_vae

    latent = prepared[0]["kl"][1]
    vae = nn.Module()
    vae.decoder = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear"))
    parallelize_vae(vae)
    with torch.no_grad():
        vae.decoder(latent)


WORLDS = [2, 4]
ERRORS = {  # a case para-fx refuses -> the error it must raise
    "mesh": ("ValueError", "whole world"),
    "processor": ("RuntimeError", "scaled_dot_product_attention"),
    "bilinear": ("NotImplementedError", "bilinear"),
}
# What does not depend on the world size (tiling switched off, a processor or a mode refused before
# any split) runs on 2 ranks only; the splits, the fallback and the mesh check on 2 and 4.
ONE_WORLD = ("tiled", "processor", "bilinear")
for _world in WORLDS:
    for _kind in CASES:
        ranks.add(_world, f"vae {_kind}", parallel_encode_decode, _kind, prepared=inputs_and_references)
    ranks.add(_world, "vae one row", logged_decode, "one row", prepared=inputs_and_references)
    ranks.add(_world, "vae conv zoo", conv_zoo_error, prepared=inputs_and_references)
    ranks.add(_world, "vae error mesh", raised, sub_mesh_parallel)
ranks.add(2, "vae tiled", logged_decode, "tiled", prepared=inputs_and_references)
ranks.add(2, "vae error processor", raised, decode_with_default_processor, prepared=inputs_and_references)
ranks.add(2, "vae error bilinear", raised, decode_bilinear, prepared=inputs_and_references)


@pytest.mark.ranks
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", list(CASES))
def test_decode_and_encode_match_one_device(world, kind):
    for rank, result in enumerate(ranks.result(world, f"vae {kind}")):
        assert result["decode"] <= TOLERANCE, (rank, result)
        assert result["encode"] <= TOLERANCE, (rank, result)


@pytest.mark.ranks
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", list(CASES))
def test_inputs_are_split_by_height(world, kind):
    image, latent = make_inputs()[kind]
    for result in ranks.result(world, f"vae {kind}"):
        rows = image.shape[-2] // (2 if kind == "wan2.2" else 1)  # patchified before the encoder
        assert result["encoder_rows"] < rows, result
        padded_chunk = -(-latent.shape[-2] // world) + 2  # a causal conv may pad its input first
        assert result["decoder_rows"] <= padded_chunk, result


@pytest.mark.ranks
@pytest.mark.parametrize("world", WORLDS)
def test_strided_dilated_and_padded_convs_on_unaligned_chunks(world):
    for error in ranks.result(world, "vae conv zoo"):
        assert error <= TOLERANCE


@pytest.mark.ranks
@pytest.mark.parametrize("world", WORLDS)
def test_too_small_latent_falls_back_with_a_warning(world):
    for error, messages in ranks.result(world, "vae one row"):
        assert error <= TOLERANCE
        assert any("cannot give each" in m for m in messages), messages


@pytest.mark.ranks
def test_tiling_is_ignored_so_the_result_stays_exact():
    for error, messages in ranks.result(2, "vae tiled"):
        assert error <= TOLERANCE
        assert any("tiling is ignored" in m for m in messages), messages


@pytest.mark.ranks
@pytest.mark.parametrize("world, case", [(world, case) for world in WORLDS for case in ERRORS if world == 2 or case not in ONE_WORLD])
def test_clear_errors(world, case):
    kind, words = ERRORS[case]
    for error in ranks.result(world, f"vae error {case}"):
        assert error is not None and error[0] == kind and words in error[1], error


def test_no_op_without_a_process_group():
    from para_fx.adapters.vae import parallelize_vae

    vae = tiny_vae("kl")
    forward = vae.decoder.forward
    assert parallelize_vae(vae) is vae
    assert vae.decoder.forward == forward
