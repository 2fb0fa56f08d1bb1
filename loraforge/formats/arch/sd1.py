"""Stable Diffusion 1.x (v1-5-pruned-emaonly layout).

UNet with 1x1-conv proj_in/proj_out and 768-wide cross-attention context;
Hugging Face CLIP ViT-L/14 text encoder under ``cond_stage_model.transformer``;
fp32 weights; LDM's noise-schedule buffers and the two EMA bookkeeping scalars.
"""

from __future__ import annotations

from .blocks import SD_BLOCKS_17, SD_BLOCKS_26
from .family import ArchitectureConfig, schedule_tensors
from .text_encoders import TextEncoderConfig
from .unet import UNetConfig
from .vae import VAEConfig

# (model channels, text width = context width, vocabulary, VAE channels)
_SIZES = {"full": (320, 768, 49408, 128), "tiny": (16, 24, 64, 8)}

EMA_SCALARS = (("model_ema.decay", (), None), ("model_ema.num_updates", (), "I32"))


def config(size: str) -> ArchitectureConfig:
    channels, width, vocab, vae_channels = _SIZES[size]
    return ArchitectureConfig(
        name="sd1",
        title="Stable Diffusion 1.x",
        size=size,
        modelspec_architecture="stable-diffusion-v1",
        ss_base_model_version="sd_v1",
        float_dtype="F32",
        unet=UNetConfig(
            model_channels=channels,
            channel_mult=(1, 2, 4, 4),
            transformer_depth=(1, 1, 1, 0),
            transformer_depth_middle=1,
            context_dim=width,
            linear_proj=False,
            kohya_uses_ldm_names=False,
        ),
        text_encoders=(
            TextEncoderConfig(
                naming="hf",
                key_prefix="cond_stage_model.transformer.text_model.",
                component="te",
                kohya_prefix="lora_te_",
                diffusers_prefix="text_encoder.",
                width=width,
                layers=12,
                vocab=vocab,
            ),
        ),
        vae=VAEConfig(channels=vae_channels),
        block_forms=((26, SD_BLOCKS_26), (17, SD_BLOCKS_17)),
        other=schedule_tensors() + EMA_SCALARS,
    )
