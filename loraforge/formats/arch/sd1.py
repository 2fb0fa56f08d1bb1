"""Stable Diffusion 1.x (v1-5-pruned-emaonly layout).

UNet with 1x1-conv proj_in/proj_out and 768-wide cross-attention context;
Hugging Face CLIP ViT-L/14 text encoder under ``cond_stage_model.transformer``
(its width is the context width); fp32 weights; LDM's noise-schedule buffers
and the two EMA bookkeeping scalars.
"""

from __future__ import annotations

from collections.abc import Mapping

from .blocks import SD_BLOCKS_17, SD_BLOCKS_26
from .family import ArchitectureConfig, Family, schedule_tensors
from .text_encoders import TextEncoderConfig
from .unet import UNET_PREFIX, UNetConfig
from .vae import VAE_PREFIX, VAEConfig

EMA_SCALARS = (("model_ema.decay", (), None), ("model_ema.num_updates", (), "I32"))
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
INPAINT_IN_CHANNELS = 9  # 4 latent + 4 masked-image latent + 1 mask


# The presets of the LoRA Block Weight extension, in the SD 1.x/2.x 17-value form
# (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03 ... OUT11).
BLOCK_PRESETS: tuple[tuple[str, tuple[float, ...]], ...] = tuple(
    (name, tuple(float(v) for v in values))
    for name, values in (
        ("NONE", (0.0,) * 17),
        ("ALL", (1.0,) * 17),
        ("INS", (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
        ("IND", (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
        ("INALL", (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
        ("MIDD", (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0)),
        ("OUTD", (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0)),
        ("OUTS", (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1)),
        ("OUTALL", (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)),
        ("ALL0.5", (0.5,) * 17),
    )
)


def sd_anchors(text_width_key: str, text_vocab_key: str) -> tuple:
    """Where SD 1.x/2.x files show their dimensions (ComfyUI's model detection reads the same places)."""
    unet = UNET_PREFIX
    return (
        ("model_channels", (
            (CONV_IN_KEY, 0, 1),
            (unet + "time_embed.0.weight", 1, 1),
            (unet + "input_blocks.1.1.proj_in.weight", 0, 1),
            (unet + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 0, 1),
            (unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 0, 1),
            (unet + "output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight", 0, 1),
        )),
        ("context", (
            (unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 1, 1),
            (unet + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1, 1),
            (unet + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", 1, 1),
            (text_width_key, 1, 1),
        )),
        ("vocab", ((text_vocab_key, 0, 1),)),
        ("vae_channels", ((VAE_PREFIX + "encoder.conv_in.weight", 0, 1),)),
    )


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
            linear_proj=False,
            kohya_uses_ldm_names=False,
        ),
        text_encoders=(
            TextEncoderConfig(
                naming="hf",
                key_prefix=TEXT_ENCODER_PREFIX,
                component="te",
                kohya_prefix="lora_te_",
                diffusers_prefix="text_encoder.",
                width=width,
                layers=12,
                vocab=dims["vocab"],
            ),
        ),
        vae=VAEConfig(channels=dims["vae_channels"]),
        block_forms=((26, SD_BLOCKS_26), (17, SD_BLOCKS_17)),
        other=schedule_tensors() + EMA_SCALARS,
    )


FAMILY = Family(
    name="sd1",
    title="Stable Diffusion 1.x",
    modelspec_architecture="stable-diffusion-v1",
    modelspec_implementation="https://github.com/CompVis/stable-diffusion",
    ss_base_model_version="sd_v1",
    ss_v2=False,
    full=(("model_channels", 320), ("context", 768), ("vocab", 49408), ("vae_channels", 128)),
    anchors=sd_anchors(
        TEXT_ENCODER_PREFIX + "encoder.layers.0.self_attn.q_proj.weight",
        TEXT_ENCODER_PREFIX + "embeddings.token_embedding.weight",
    ),
    configure=config,
    inpaint_key=CONV_IN_KEY,
    inpaint_in_channels=INPAINT_IN_CHANNELS,
    block_presets=BLOCK_PRESETS,
    preset_form=SD_BLOCKS_17,
)
