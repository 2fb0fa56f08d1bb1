"""Stable Diffusion 2.x (v2-1_768-ema-pruned layout).

UNet with linear proj_in/proj_out and 1024-wide context (attention head
width 64 changes no shape); OpenCLIP ViT-H/14 text encoder under
``cond_stage_model.model`` (its width is the context width) with all 24
resblocks (SD 2 reads the penultimate one, but the checkpoint keeps the last);
fp32 weights; noise-schedule buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

from .blocks import SD_BLOCKS_17, SD_BLOCKS_26
from .family import ArchitectureConfig, Family, schedule_tensors
from .sd1 import BLOCK_PRESETS, CONV_IN_KEY, INPAINT_IN_CHANNELS, sd_anchors
from .text_encoders import TextEncoderConfig
from .unet import UNetConfig
from .vae import VAEConfig

TEXT_ENCODER_PREFIX = "cond_stage_model.model."


def config(dims: Mapping[str, int]) -> ArchitectureConfig:
    width = dims["context"]
    return ArchitectureConfig(
        family=FAMILY,
        dimensions=FAMILY.dimensions(dims),
        float_dtype="F32",
        unet=UNetConfig(
            model_channels=dims["model_channels"],
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
                key_prefix=TEXT_ENCODER_PREFIX,
                component="te",
                kohya_prefix="lora_te_",
                diffusers_prefix="text_encoder.",
                width=width,
                layers=24,
                vocab=dims["vocab"],
                projection_dim=width,
            ),
        ),
        vae=VAEConfig(channels=dims["vae_channels"]),
        block_forms=((26, SD_BLOCKS_26), (17, SD_BLOCKS_17)),
        other=schedule_tensors(),
    )


FAMILY = Family(
    name="sd2",
    title="Stable Diffusion 2.x",
    modelspec_architecture="stable-diffusion-v2-768-v",
    modelspec_implementation="https://github.com/Stability-AI/stablediffusion",
    ss_base_model_version="sd_v2",
    ss_v2=True,
    full=(("model_channels", 320), ("context", 1024), ("vocab", 49408), ("vae_channels", 128)),
    anchors=sd_anchors(
        TEXT_ENCODER_PREFIX + "transformer.resblocks.0.attn.in_proj_weight",
        TEXT_ENCODER_PREFIX + "token_embedding.weight",
    ),
    configure=config,
    inpaint_key=CONV_IN_KEY,
    inpaint_in_channels=INPAINT_IN_CHANNELS,
    block_presets=BLOCK_PRESETS,
    preset_form=SD_BLOCKS_17,
)
