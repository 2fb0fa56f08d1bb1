"""Text encoders in the two namings that Stable Diffusion checkpoints use.

* Hugging Face CLIP (``transformers.CLIPTextModel``): SD 1.x
  (``cond_stage_model.transformer.text_model.*``) and SDXL's first encoder
  (``conditioner.embedders.0.transformer.text_model.*``).
* OpenCLIP: SD 2.x (``cond_stage_model.model.*``) and SDXL's second encoder
  (``conditioner.embedders.1.model.*``). Its attention keeps q, k and v in one
  fused ``attn.in_proj_weight`` of 3*width rows; LoRA formats address them by
  their Hugging Face names, so each is a row slice of the fused weight here.

LoRA module names are always the Hugging Face paths, whichever naming the
checkpoint uses: kohya ``<prefix>text_model_encoder_layers_<i>_self_attn_q_proj``
and diffusers ``<component>.text_model.encoder.layers.<i>.self_attn.q_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._builder import TableBuilder, kohya_name

CONTEXT_LENGTH = 77  # CLIP's token window, the same in every SD text encoder


@dataclass(frozen=True)
class TextEncoderConfig:
    naming: str  # "hf" or "openclip"
    key_prefix: str  # e.g. "cond_stage_model.transformer.text_model."
    component: str  # "te", "te1" or "te2"
    kohya_prefix: str  # "lora_te_", "lora_te1_", "lora_te2_"
    diffusers_prefix: str  # "text_encoder.", "text_encoder_2."
    width: int
    layers: int
    vocab: int = 49408
    projection_dim: int | None = None  # OpenCLIP text_projection output width
    block: str = "BASE"  # LoRA-Block-Weight block of every module (Flux: "CLIP", "T5")
    position_ids: bool = True  # HF CLIP: the position_ids buffer is saved (Flux all-in-one files lack it)
    # T5 encoder (naming "t5"): attention heads, q/k/v width (heads x d_kv), gated-FF width.
    heads: int = 0
    inner: int = 0
    ff: int = 0


def _hf_module_path(layer: int, name: str) -> str:
    return f"text_model.encoder.layers.{layer}.{name}"


def _targets(config: TextEncoderConfig, layer: int, name: str) -> tuple[str, str, str]:
    path = _hf_module_path(layer, name)
    return kohya_name(config.kohya_prefix, path), config.diffusers_prefix + path, config.block


def build_text_encoder(builder: TableBuilder, config: TextEncoderConfig) -> None:
    if config.naming == "hf":
        _build_hf_clip(builder, config)
    elif config.naming == "openclip":
        _build_openclip(builder, config)
    elif config.naming == "t5":
        _build_t5(builder, config)
    else:
        raise ValueError(f"unknown text encoder naming {config.naming!r}")


def _build_hf_clip(builder: TableBuilder, c: TextEncoderConfig) -> None:
    p, w, ff = c.key_prefix, c.width, 4 * c.width
    builder.tensor(f"{p}embeddings.token_embedding.weight", (c.vocab, w), c.component)
    builder.tensor(f"{p}embeddings.position_embedding.weight", (CONTEXT_LENGTH, w), c.component)
    if c.position_ids:
        builder.tensor(f"{p}embeddings.position_ids", (1, CONTEXT_LENGTH), c.component, dtype="I64")
    for i in range(c.layers):
        layer = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            builder.layer(f"{layer}self_attn.{proj}", (w, w), c.component, target=_targets(c, i, f"self_attn.{proj}"))
        builder.norm(f"{layer}layer_norm1", w, c.component)
        builder.layer(f"{layer}mlp.fc1", (ff, w), c.component, target=_targets(c, i, "mlp.fc1"))
        builder.layer(f"{layer}mlp.fc2", (w, ff), c.component, target=_targets(c, i, "mlp.fc2"))
        builder.norm(f"{layer}layer_norm2", w, c.component)
    builder.norm(f"{p}final_layer_norm", w, c.component)


def _build_openclip(builder: TableBuilder, c: TextEncoderConfig) -> None:
    p, w, ff = c.key_prefix, c.width, 4 * c.width
    builder.tensor(f"{p}positional_embedding", (CONTEXT_LENGTH, w), c.component)
    builder.tensor(f"{p}text_projection", (w, c.projection_dim or w), c.component)
    builder.tensor(f"{p}logit_scale", (), c.component)
    builder.tensor(f"{p}token_embedding.weight", (c.vocab, w), c.component)
    builder.norm(f"{p}ln_final", w, c.component)
    for i in range(c.layers):
        block = f"{p}transformer.resblocks.{i}."
        fused_weight, fused_bias = f"{block}attn.in_proj_weight", f"{block}attn.in_proj_bias"
        builder.tensor(fused_weight, (3 * w, w), c.component)
        builder.tensor(fused_bias, (3 * w,), c.component)
        for n, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            builder.fused_rows(fused_weight, fused_bias, (n * w, (n + 1) * w), w, c.component, _targets(c, i, f"self_attn.{proj}"))
        builder.layer(f"{block}attn.out_proj", (w, w), c.component, target=_targets(c, i, "self_attn.out_proj"))
        builder.norm(f"{block}ln_1", w, c.component)
        builder.layer(f"{block}mlp.c_fc", (ff, w), c.component, target=_targets(c, i, "mlp.fc1"))
        builder.layer(f"{block}mlp.c_proj", (w, ff), c.component, target=_targets(c, i, "mlp.fc2"))
        builder.norm(f"{block}ln_2", w, c.component)


T5_RELATIVE_BUCKETS = 32  # T5's relative_attention_num_buckets


def _build_t5(builder: TableBuilder, c: TextEncoderConfig) -> None:
    """transformers' T5EncoderModel (Flux's T5-XXL): gated-GELU FF, RMS layer norms, no biases.

    LoRA names are the module paths (kohya ``lora_te3_encoder_block_0_layer_0_SelfAttention_q``).
    """
    p, w = c.key_prefix, c.width
    builder.tensor(f"{p}shared.weight", (c.vocab, w), c.component)
    for i in range(c.layers):
        block = f"encoder.block.{i}."
        for proj in ("q", "k", "v"):
            path = f"{block}layer.0.SelfAttention.{proj}"
            builder.layer(p + path, (c.inner, w), c.component, bias=False, target=_t5_target(c, path))
        path = f"{block}layer.0.SelfAttention.o"
        builder.layer(p + path, (w, c.inner), c.component, bias=False, target=_t5_target(c, path))
        if i == 0:
            builder.tensor(f"{p}{block}layer.0.SelfAttention.relative_attention_bias.weight", (T5_RELATIVE_BUCKETS, c.heads), c.component)
        builder.tensor(f"{p}{block}layer.0.layer_norm.weight", (w,), c.component)
        for proj, shape in (("wi_0", (c.ff, w)), ("wi_1", (c.ff, w)), ("wo", (w, c.ff))):
            path = f"{block}layer.1.DenseReluDense.{proj}"
            builder.layer(p + path, shape, c.component, bias=False, target=_t5_target(c, path))
        builder.tensor(f"{p}{block}layer.1.layer_norm.weight", (w,), c.component)
    builder.tensor(f"{p}encoder.final_layer_norm.weight", (w,), c.component)


def _t5_target(c: TextEncoderConfig, path: str) -> tuple[str, str, str]:
    return kohya_name(c.kohya_prefix, path), c.diffusers_prefix + path, c.block
