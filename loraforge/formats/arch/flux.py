"""Flux.1 (black-forest-labs/flux ``src/flux/model.py``): dev, schnell, Fill and Depth/Canny.

The transformer in BFL's naming: ``img_in``, ``time_in`` / ``vector_in`` /
``guidance_in`` (MLPEmbedder ``in_layer`` / ``out_layer``), ``txt_in``, then
``depth`` double-stream blocks (``double_blocks.N.{img,txt}_{attn.qkv,
attn.proj, attn.norm.{query,key}_norm.scale, mlp.0, mlp.2, mod.lin}``) and
``depth_single`` single-stream blocks (``single_blocks.N.{linear1, linear2,
norm.{query,key}_norm.scale, modulation.lin}``), and ``final_layer.{linear,
adaLN_modulation.1}``. At full size: hidden 3072 (24 heads of 128), MLP ratio
4, 19 + 38 blocks, 64 latent channels in and out, T5 context 4096, CLIP
pooled vector 768, timestep embedding 256; 780 tensors.

Two key layouts: BFL's bare transformer file (``flux1-dev.safetensors``), and
the all-in-one single file with ``model.diffusion_model.`` (transformer),
``text_encoders.clip_l.transformer.`` (CLIP-L, Hugging Face naming),
``text_encoders.t5xxl.transformer.`` (T5-XXL encoder) and ``vae.`` (the
16-channel autoencoder, LDM naming without quant convs); any component but
the transformer may be absent. The dimension ``all_in_one`` (0/1) picks the
layout, read off the keys.

Variants (diffusers ``infer_diffusers_model_type``): no ``guidance_in`` is
schnell; ``img_in`` with 6x the latent channels as inputs (384 at full size)
is Fill, with 2x (128) Depth/Canny; otherwise dev. ``guidance`` (0/1) and
``in_channels`` are dimensions read from the file, so each variant is its own
table. LoRA names (kohya, ComfyUI, diffusers/PEFT, OneTrainer, ...) are in
formats/adapters/flux_names.py; the table's canonical names are kohya's
(``lora_unet_double_blocks_0_img_attn_qkv``) and ComfyUI's dotted BFL path
(``diffusion_model.double_blocks.0.img_attn.qkv``).

Block ids are those of the LoRA Block Weight extension's Flux form (61 values
at full size): CLIP, T5, IN (img_in, txt_in, time_in, vector_in,
guidance_in), D00-D18, S00-S37, OUT (final_layer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ._builder import TableBuilder, kohya_name
from .family import ArchitectureConfig, Family
from .text_encoders import TextEncoderConfig
from .vae import VAEConfig

TRANSFORMER_PREFIX = "model.diffusion_model."  # all-in-one layout; BFL's own file has none
CLIP_L_PREFIX = "text_encoders.clip_l.transformer.text_model."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."  # ComfyUI's dotted LoRA names
MLP_RATIO = 4
TIMESTEP_DIM = 256  # sinusoidal timestep / guidance embedding width (fixed in BFL's code)
FILL_RATIO, CONTROL_RATIO = 6, 2  # img_in inputs / latent channels: Fill 384/64, Depth-Canny 128/64
BLOCK_IN, BLOCK_OUT, BLOCK_CLIP, BLOCK_T5 = "IN", "OUT", "CLIP", "T5"

VARIANT_TITLES = {
    # BFL writes "FLUX.1 [dev]"; brackets would read as markup in the terminal's rich text.
    "dev": "Flux.1 dev",
    "schnell": "Flux.1 schnell",
    "fill": "Flux.1 Fill dev",
    "control": "Flux.1 Depth/Canny dev",
}


def double_block(i: int) -> str:
    return f"D{i:02d}"


def single_block(i: int) -> str:
    return f"S{i:02d}"


def block_form(depth: int, depth_single: int) -> tuple[str, ...]:
    """CLIP, T5, IN, D00..., S00..., OUT: 61 ids at full size (LoRA Block Weight's Flux order)."""
    return (
        (BLOCK_CLIP, BLOCK_T5, BLOCK_IN)
        + tuple(double_block(i) for i in range(depth))
        + tuple(single_block(i) for i in range(depth_single))
        + (BLOCK_OUT,)
    )


# Block-id prefixes of the Flux form, in its order: the groups a preset gives one value each.
BLOCK_GROUPS = (BLOCK_CLIP, BLOCK_T5, BLOCK_IN, "D", "S", BLOCK_OUT)


def _preset(name: str, **values: float) -> tuple[str, tuple[tuple[str, float], ...]]:
    return name, tuple((group, float(values[group])) for group in BLOCK_GROUPS)


# Named Flux presets, one value per block group so they fit any block count (docs/architectures.md,
# "Flux block weights"). FLUXALL is the LoRA Block Weight extension's only Flux preset
# (hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py DEF_WEIGHT_PRESET: 61 ones);
# DOUBLES, SINGLES and NOTEXT are loraforge's: only the double blocks, only the single blocks, every
# block but the two text encoders.
BLOCK_PRESETS = (
    _preset("FLUXALL", CLIP=1, T5=1, IN=1, D=1, S=1, OUT=1),
    _preset("DOUBLES", CLIP=0, T5=0, IN=0, D=1, S=0, OUT=0),
    _preset("SINGLES", CLIP=0, T5=0, IN=0, D=0, S=1, OUT=0),
    _preset("NOTEXT", CLIP=0, T5=0, IN=1, D=1, S=1, OUT=1),
)


def variant_of(dims: Mapping[str, int]) -> str:
    if not dims["guidance"]:
        return "schnell"
    if dims["in_channels"] == FILL_RATIO * dims["out_channels"]:
        return "fill"
    if dims["in_channels"] == CONTROL_RATIO * dims["out_channels"]:
        return "control"
    return "dev"


def build_transformer(builder: TableBuilder, dims: Mapping[str, int]) -> None:
    """The transformer's tensors in BFL's state-dict order; every linear layer is a LoRA target."""
    p = TRANSFORMER_PREFIX if dims["all_in_one"] else ""
    h, mlp = dims["hidden"], MLP_RATIO * dims["hidden"]

    def linear(path: str, out: int, inp: int, block: str) -> None:
        builder.layer(p + path, (out, inp), "unet", target=(kohya_name(KOHYA_PREFIX, path), COMFY_PREFIX + path, block))

    def qk_norm(path: str) -> None:
        for norm in ("query_norm", "key_norm"):
            builder.tensor(f"{p}{path}.{norm}.scale", (dims["head_dim"],), "unet")

    linear("img_in", h, dims["in_channels"], BLOCK_IN)
    linear("time_in.in_layer", h, TIMESTEP_DIM, BLOCK_IN)
    linear("time_in.out_layer", h, h, BLOCK_IN)
    linear("vector_in.in_layer", h, dims["vec_in"], BLOCK_IN)
    linear("vector_in.out_layer", h, h, BLOCK_IN)
    if dims["guidance"]:
        linear("guidance_in.in_layer", h, TIMESTEP_DIM, BLOCK_IN)
        linear("guidance_in.out_layer", h, h, BLOCK_IN)
    linear("txt_in", h, dims["context_in"], BLOCK_IN)
    for i in range(dims["depth"]):
        block = double_block(i)
        for stream in ("img", "txt"):
            d = f"double_blocks.{i}.{stream}_"
            linear(f"{d}mod.lin", 6 * h, h, block)
            linear(f"{d}attn.qkv", 3 * h, h, block)
            qk_norm(f"{d}attn.norm")
            linear(f"{d}attn.proj", h, h, block)
            linear(f"{d}mlp.0", mlp, h, block)
            linear(f"{d}mlp.2", h, mlp, block)
    for i in range(dims["depth_single"]):
        block = single_block(i)
        s = f"single_blocks.{i}."
        linear(f"{s}linear1", 3 * h + mlp, h, block)
        linear(f"{s}linear2", h, h + mlp, block)
        qk_norm(f"{s}norm")
        linear(f"{s}modulation.lin", 3 * h, h, block)
    linear("final_layer.linear", dims["out_channels"], h, BLOCK_OUT)
    linear("final_layer.adaLN_modulation.1", 2 * h, h, BLOCK_OUT)


def config(dims: Mapping[str, int]) -> ArchitectureConfig:
    dims = dict(FAMILY.dimensions(dims))
    all_in_one = bool(dims["all_in_one"])
    text_encoders = ()
    if all_in_one:
        text_encoders = (
            TextEncoderConfig(
                naming="hf", key_prefix=CLIP_L_PREFIX, component="te1", kohya_prefix="lora_te1_",
                diffusers_prefix="text_encoder.", width=dims["clip_l_width"], layers=12, vocab=dims["clip_vocab"],
                block=BLOCK_CLIP, position_ids=False,
            ),
            TextEncoderConfig(
                naming="t5", key_prefix=T5_PREFIX, component="te2", kohya_prefix="lora_te3_",
                diffusers_prefix="text_encoder_2.", width=dims["t5_width"], layers=dims["t5_layers"],
                vocab=dims["t5_vocab"], block=BLOCK_T5, heads=dims["t5_heads"],
                inner=dims["t5_inner"], ff=dims["t5_ff"],
            ),
        )
    variant = variant_of(dims)
    form = block_form(dims["depth"], dims["depth_single"])
    return ArchitectureConfig(
        family=FAMILY,
        dimensions=FAMILY.dimensions(dims),
        float_dtype="BF16",
        unet=None,
        builders=(lambda builder: build_transformer(builder, dims),),
        text_encoders=text_encoders,
        vae=VAEConfig(channels=dims["vae_channels"], z_channels=16, prefix=VAE_PREFIX, quant_conv=False) if all_in_one else None,
        block_forms=((len(form), form),),
        variant=variant,
        title=VARIANT_TITLES[variant],
        modelspec_architecture=SCHNELL_MODELSPEC if variant == "schnell" else None,
    )


_BLOCK_INDEX = re.compile(r"(?:^|\.)(double_blocks|single_blocks)\.(\d+)\.")
_T5_BLOCK = re.compile(r"(?:^|\.)encoder\.block\.(\d+)\.")


def infer_extra(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Block counts, layout and guidance, from the keys (the anchors read the widths)."""
    found: dict[str, int] = {}
    counts = {"double_blocks": -1, "single_blocks": -1}
    t5_layers = -1
    prefixed = bare = False
    for key in shapes:
        if key.startswith(TRANSFORMER_PREFIX):
            prefixed = True
            key = key[len(TRANSFORMER_PREFIX):]
            body = key
        else:
            body = key
            bare = bare or body.startswith(("double_blocks.", "single_blocks.", "img_in.", "final_layer."))
        match = _BLOCK_INDEX.match(body) if body.startswith(("double_blocks.", "single_blocks.")) else None
        if match:
            counts[match.group(1)] = max(counts[match.group(1)], int(match.group(2)))
        if key.startswith(T5_PREFIX):
            t5 = _T5_BLOCK.search(key[len(T5_PREFIX) - 1:])
            if t5:
                t5_layers = max(t5_layers, int(t5.group(1)))
    hidden = _hidden_from_any_block(shapes)
    if hidden:
        found["hidden"] = hidden
    if counts["double_blocks"] >= 0:
        found["depth"] = counts["double_blocks"] + 1
    if counts["single_blocks"] >= 0:
        found["depth_single"] = counts["single_blocks"] + 1
    if t5_layers >= 0:
        found["t5_layers"] = t5_layers + 1
    if prefixed or bare:
        found["all_in_one"] = int(prefixed)
    # schnell = no guidance_in where a checkpoint would have it (next to time_in); an adapter that
    # adapts neither says nothing about the variant (dev, the default).
    if any(k.endswith("time_in.in_layer.weight") for k in shapes):
        found["guidance"] = int(any(k.endswith("guidance_in.in_layer.weight") for k in shapes))
    return found


# Transformer weights whose input width is the hidden size (a LoRA may touch any block but block 0).
_HIDDEN_INPUT = re.compile(
    r"(?:^|\.)(?:double_blocks\.\d+\.(?:img|txt)_(?:attn\.qkv|attn\.proj|mlp\.0|mod\.lin)"
    r"|single_blocks\.\d+\.(?:linear1|modulation\.lin)|final_layer\.(?:linear|adaLN_modulation\.1))\.weight$"
)


def _hidden_from_any_block(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for key in sorted(shapes):
        shape = shapes[key]
        if len(shape) == 2 and _HIDDEN_INPUT.search(key):
            return int(shape[1])
    return None


def _anchors(name: str, *places: tuple[str, int, int]) -> tuple[str, tuple]:
    """Each transformer place in both layouts."""
    return name, tuple((prefix + key, axis, div) for key, axis, div in places for prefix in ("", TRANSFORMER_PREFIX))


SCHNELL_MODELSPEC = "flux-1-schnell"
FAMILY = Family(
    name="flux",
    title="Flux.1",
    modelspec_architecture="flux-1-dev",  # kohya sai_model_spec ARCH_FLUX_1_DEV; schnell: ARCH_FLUX_1_SCHNELL
    modelspec_implementation="https://github.com/black-forest-labs/flux",  # kohya IMPL_FLUX
    ss_base_model_version="flux1",  # kohya flux_utils.MODEL_VERSION_FLUX_V1
    ss_network_module="networks.lora_flux",  # kohya networks/lora_flux.py, as its training and extraction write it
    ss_v2=False,
    full=(
        ("hidden", 3072),
        ("head_dim", 128),
        ("depth", 19),
        ("depth_single", 38),
        ("in_channels", 64),
        ("out_channels", 64),
        ("context_in", 4096),
        ("vec_in", 768),
        ("guidance", 1),
        ("all_in_one", 1),
        ("clip_l_width", 768),
        ("clip_vocab", 49408),
        ("t5_width", 4096),
        ("t5_heads", 64),
        ("t5_inner", 64 * 64),
        ("t5_ff", 10240),
        ("t5_layers", 24),
        ("t5_vocab", 32128),
        ("vae_channels", 128),
    ),
    anchors=(
        _anchors("hidden",
                 ("img_in.weight", 0, 1), ("double_blocks.0.img_attn.qkv.weight", 1, 1),
                 ("double_blocks.0.img_attn.proj.weight", 0, 1), ("single_blocks.0.linear1.weight", 1, 1),
                 ("double_blocks.0.txt_attn.qkv.weight", 1, 1), ("final_layer.linear.weight", 1, 1)),
        _anchors("head_dim", ("double_blocks.0.img_attn.norm.query_norm.scale", 0, 1),
                 ("single_blocks.0.norm.query_norm.scale", 0, 1)),
        _anchors("in_channels", ("img_in.weight", 1, 1)),
        _anchors("out_channels", ("final_layer.linear.weight", 0, 1)),
        _anchors("context_in", ("txt_in.weight", 1, 1)),
        _anchors("vec_in", ("vector_in.in_layer.weight", 1, 1)),
        ("clip_l_width", ((CLIP_L_PREFIX + "encoder.layers.0.self_attn.q_proj.weight", 1, 1),)),
        ("clip_vocab", ((CLIP_L_PREFIX + "embeddings.token_embedding.weight", 0, 1),)),
        ("t5_width", ((T5_PREFIX + "encoder.block.0.layer.0.SelfAttention.q.weight", 1, 1),)),
        ("t5_heads", ((T5_PREFIX + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1, 1),)),
        ("t5_inner", ((T5_PREFIX + "encoder.block.0.layer.0.SelfAttention.q.weight", 0, 1),)),
        ("t5_ff", ((T5_PREFIX + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", 0, 1),)),
        ("t5_vocab", ((T5_PREFIX + "shared.weight", 0, 1),)),
        ("vae_channels", ((VAE_PREFIX + "encoder.conv_in.weight", 0, 1),)),
    ),
    configure=config,
    inpaint_key="",  # Fill is a variant of its own (in_channels), not an inpaint deviation
    inpaint_in_channels=0,
    infer_extra=infer_extra,
    variant_dimensions=("guidance", "all_in_one", "in_channels"),
    group_presets=BLOCK_PRESETS,
    adapter_prefixes=(
        (KOHYA_PREFIX, "unet"),  # shared with SD: already "unet"
        (COMFY_PREFIX, "unet"),
        ("transformer.", "unet"),
        ("lora_transformer_", "unet"),
        ("lycoris_", "unet"),
        ("double_blocks.", "unet"),
        ("single_blocks.", "unet"),
        ("lora_te3_", "te2"),
    ),
)
