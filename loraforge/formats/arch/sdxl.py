"""Stable Diffusion XL base 1.0 (sd_xl_base_1.0 layout).

Three-level UNet (320/640/1280 channels, transformer depth 0/2/10, middle 10)
with linear projections, 2048-wide context (CLIP-L 768 + OpenCLIP bigG 1280)
and a vector-conditioning embedding ``label_emb`` of 2816 inputs (bigG pooled
1280 + six 256-wide size/crop embeddings). Text encoders under
``conditioner.embedders.0`` (HF CLIP ViT-L) and ``conditioner.embedders.1``
(OpenCLIP bigG, 32 resblocks, width 1280, with text_projection). The release
file stores fp16 weights and no noise-schedule buffers (SGM keeps the schedule
outside the state dict).
"""

from __future__ import annotations

from collections.abc import Mapping

from .blocks import SDXL_BLOCKS_12, SDXL_BLOCKS_20
from .family import ArchitectureConfig, Family
from .sd1 import CONV_IN_KEY, INPAINT_IN_CHANNELS
from .text_encoders import TextEncoderConfig
from .unet import UNET_PREFIX, UNetConfig
from .vae import VAE_PREFIX, VAEConfig

SIZE_CONDITIONS = 6  # original size, crop top-left, target size: 2 numbers each
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
CLIP_G_PREFIX = "conditioner.embedders.1.model."


def config(dims: Mapping[str, int]) -> ArchitectureConfig:
    return ArchitectureConfig(
        family=FAMILY,
        dimensions=FAMILY.dimensions(dims),
        float_dtype="F16",
        unet=UNetConfig(
            model_channels=dims["model_channels"],
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 2, 10),
            transformer_depth_middle=10,
            context_dim=dims["context"],
            linear_proj=True,
            kohya_uses_ldm_names=True,
            adm_in_channels=dims["adm_in_channels"],
        ),
        text_encoders=(
            TextEncoderConfig(
                naming="hf",
                key_prefix=CLIP_L_PREFIX,
                component="te1",
                kohya_prefix="lora_te1_",
                diffusers_prefix="text_encoder.",
                width=dims["clip_l_width"],
                layers=12,
                vocab=dims["vocab"],
            ),
            TextEncoderConfig(
                naming="openclip",
                key_prefix=CLIP_G_PREFIX,
                component="te2",
                kohya_prefix="lora_te2_",
                diffusers_prefix="text_encoder_2.",
                width=dims["clip_g_width"],
                layers=32,
                vocab=dims["vocab"],
                projection_dim=dims["clip_g_width"],
            ),
        ),
        vae=VAEConfig(channels=dims["vae_channels"]),
        block_forms=((20, SDXL_BLOCKS_20), (12, SDXL_BLOCKS_12)),
    )


_UNET = UNET_PREFIX
FAMILY = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    ss_base_model_version="sdxl_base_v1-0",
    ss_v2=False,
    full=(
        ("model_channels", 320),
        ("context", 768 + 1280),
        ("clip_l_width", 768),
        ("clip_g_width", 1280),
        ("vocab", 49408),
        ("adm_in_channels", 1280 + SIZE_CONDITIONS * 256),
        ("vae_channels", 128),
    ),
    anchors=(
        ("model_channels", (
            (CONV_IN_KEY, 0, 1),
            (_UNET + "time_embed.0.weight", 1, 1),
            (_UNET + "input_blocks.4.1.proj_in.weight", 0, 2),
            (_UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", 0, 2),
            (_UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", 0, 2),
            (_UNET + "output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight", 0, 2),
        )),
        ("context", (
            (_UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", 1, 1),
            (_UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1, 1),
            (_UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", 1, 1),
        )),
        ("clip_l_width", ((CLIP_L_PREFIX + "encoder.layers.0.self_attn.q_proj.weight", 1, 1),)),
        ("clip_g_width", ((CLIP_G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight", 1, 1),)),
        ("vocab", (
            (CLIP_L_PREFIX + "embeddings.token_embedding.weight", 0, 1),
            (CLIP_G_PREFIX + "token_embedding.weight", 0, 1),
        )),
        ("adm_in_channels", ((_UNET + "label_emb.0.0.weight", 1, 1),)),
        ("vae_channels", ((VAE_PREFIX + "encoder.conv_in.weight", 0, 1),)),
    ),
    configure=config,
    inpaint_key=CONV_IN_KEY,
    inpaint_in_channels=INPAINT_IN_CHANNELS,
)
