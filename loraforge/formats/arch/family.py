"""Assembles an Architecture from the configs of its parts.

sd1.py, sd2.py and sdxl.py are configuration only; this is the one place that
turns a configuration into the table (tensors in checkpoint order: UNet, text
encoders, VAE, then the remaining tensors of a full checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._builder import TableBuilder
from .table import Architecture
from .text_encoders import TextEncoderConfig, build_text_encoder
from .unet import UNetConfig, build_unet
from .vae import VAEConfig, build_vae

# Noise-schedule buffers that LDM's LatentDiffusion registers and that SD 1.x/2.x
# checkpoints therefore carry (one value per training timestep).
SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
TRAINING_TIMESTEPS = 1000


@dataclass(frozen=True)
class ArchitectureConfig:
    name: str
    title: str
    size: str
    modelspec_architecture: str
    ss_base_model_version: str
    float_dtype: str
    unet: UNetConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    vae: VAEConfig
    block_forms: tuple[tuple[int, tuple[str, ...]], ...]  # (length, block ids), longest first
    # Other tensors of a full checkpoint: (key, shape, dtype or None for float_dtype).
    other: tuple[tuple[str, tuple[int, ...], str | None], ...] = ()


def schedule_tensors() -> tuple[tuple[str, tuple[int, ...], None], ...]:
    return tuple((name, (TRAINING_TIMESTEPS,), None) for name in SCHEDULE_BUFFERS)


def assemble(config: ArchitectureConfig) -> Architecture:
    builder = TableBuilder(config.float_dtype)
    build_unet(builder, config.unet)
    for text_encoder in config.text_encoders:
        build_text_encoder(builder, text_encoder)
    build_vae(builder, config.vae)
    for key, shape, dtype in config.other:
        builder.tensor(key, shape, "other", dtype=dtype)
    return Architecture(
        name=config.name,
        title=config.title,
        size=config.size,
        modelspec_architecture=config.modelspec_architecture,
        ss_base_model_version=config.ss_base_model_version,
        tensors=tuple(builder.tensors),
        modules=tuple(builder.modules),
        block_forms=dict(config.block_forms),
    )
