"""Stable Diffusion 2.x (v2-1_768-ema-pruned layout).

UNet with linear proj_in/proj_out and 1024-wide context (attention head
width 64 changes no shape); OpenCLIP ViT-H/14 text encoder under
``cond_stage_model.model`` with all 24 resblocks (SD 2 reads the penultimate
one, but the checkpoint keeps the last); fp32 weights; noise-schedule buffers.
"""

from __future__ import annotations

from .blocks import SD_BLOCKS_17, SD_BLOCKS_26
from .family import ArchitectureConfig, schedule_tensors
from .text_encoders import TextEncoderConfig
from .unet import UNetConfig
from .vae import VAEConfig

# (model channels, text width = context width, vocabulary, VAE channels)
_SIZES = {"full": (320, 1024, 49408, 128), "tiny": (16, 32, 64, 8)}


def config(size: str) -> ArchitectureConfig:
    channels, width, vocab, vae_channels = _SIZES[size]
    return ArchitectureConfig(
        name="sd2",
        title="Stable Diffusion 2.x",
        size=size,
        modelspec_architecture="stable-diffusion-v2-768-v",
        ss_base_model_version="sd_v2",
        float_dtype="F32",
        unet=UNetConfig(
            model_channels=channels,
            channel_mult=(1, 2, 4, 4),
            transformer_depth=(1, 1, 1, 0),
            transformer_depth_middle=1,
            context_dim=width,
            linear_proj=True,
            kohya_uses_ldm_names=False,
        ),
        text_encoders=(
            TextEncoderConfig(
                naming="openclip",
                key_prefix="cond_stage_model.model.",
                component="te",
                kohya_prefix="lora_te_",
                diffusers_prefix="text_encoder.",
                width=width,
                layers=24,
                vocab=vocab,
                projection_dim=width,
            ),
        ),
        vae=VAEConfig(channels=vae_channels),
        block_forms=((26, SD_BLOCKS_26), (17, SD_BLOCKS_17)),
        other=schedule_tensors(),
    )
