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

from .blocks import SDXL_BLOCKS_12, SDXL_BLOCKS_20
from .family import ArchitectureConfig
from .text_encoders import TextEncoderConfig
from .unet import UNetConfig
from .vae import VAEConfig

# (model channels, CLIP-L width, bigG width, vocabulary, size-embedding width, VAE channels)
_SIZES = {"full": (320, 768, 1280, 49408, 256, 128), "tiny": (16, 16, 32, 64, 8, 8)}
SIZE_CONDITIONS = 6  # original size, crop top-left, target size: 2 numbers each


def config(size: str) -> ArchitectureConfig:
    channels, width1, width2, vocab, size_embed, vae_channels = _SIZES[size]
    return ArchitectureConfig(
        name="sdxl",
        title="Stable Diffusion XL",
        size=size,
        modelspec_architecture="stable-diffusion-xl-v1-base",
        ss_base_model_version="sdxl_base_v1-0",
        float_dtype="F16",
        unet=UNetConfig(
            model_channels=channels,
            channel_mult=(1, 2, 4),
            transformer_depth=(0, 2, 10),
            transformer_depth_middle=10,
            context_dim=width1 + width2,
            linear_proj=True,
            kohya_uses_ldm_names=True,
            adm_in_channels=width2 + SIZE_CONDITIONS * size_embed,
        ),
        text_encoders=(
            TextEncoderConfig(
                naming="hf",
                key_prefix="conditioner.embedders.0.transformer.text_model.",
                component="te1",
                kohya_prefix="lora_te1_",
                diffusers_prefix="text_encoder.",
                width=width1,
                layers=12,
                vocab=vocab,
            ),
            TextEncoderConfig(
                naming="openclip",
                key_prefix="conditioner.embedders.1.model.",
                component="te2",
                kohya_prefix="lora_te2_",
                diffusers_prefix="text_encoder_2.",
                width=width2,
                layers=32,
                vocab=vocab,
                projection_dim=width2,
            ),
        ),
        vae=VAEConfig(channels=vae_channels),
        block_forms=((20, SDXL_BLOCKS_20), (12, SDXL_BLOCKS_12)),
    )
