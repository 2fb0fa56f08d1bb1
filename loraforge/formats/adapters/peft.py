"""diffusers / PEFT LoRA: ``<name>.lora_A.weight`` (down) and ``<name>.lora_B.weight`` (up).

Names are dotted diffusers module paths with a component prefix (``unet.``,
``text_encoder.``, ``text_encoder_2.``). The older diffusers attention-processor
layout ``<name>.lora.down.weight`` / ``<name>.lora.up.weight`` and the
training scripts' ``<name>.lora_linear_layer.down.weight`` / ``.up.weight``
(text-encoder projections) are read too, and
PEFT's DoRA magnitude ``<name>.lora_magnitude_vector`` counts as a dora_scale.

PEFT keeps ``lora_alpha`` outside the tensors. We take alpha from, in order:
an ``<name>.alpha`` tensor; the diffusers ``lora_adapter_metadata`` JSON in the
file's metadata (``<component>.lora_alpha`` / ``lora_alpha``, with
``alpha_pattern`` overrides and ``use_rslora``); otherwise none, i.e. scale 1
(alpha = rank), which is what diffusers assumes when no config is given.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from loraforge.errors import FormatError

from . import lora

KIND = lora.KIND
SUFFIXES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_A.default.weight": "down",
    "lora_B.default.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    # diffusers' training scripts (convert_state_dict_to_diffusers) on text-encoder projections.
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    # XLabs' Flux LoRAs (double_blocks.0.processor.qkv_lora1.down.weight; no alpha: scale 1).
    "down.weight": "down",
    "up.weight": "up",
}
# Shared (kind-independent) suffix for PEFT's DoRA magnitude.
DORA_SUFFIXES = {
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "lora_magnitude_vector.default.weight": "dora_scale",
}

build = lora.build
natural_delta = lora.natural_delta


class PeftKind(lora.LoraKind):
    """diffusers/PEFT LoRA halves (``lora_A``/``lora_B``): kind "lora", spelled differently."""

    family = "peft"
    suffixes = SUFFIXES

METADATA_KEY = "lora_adapter_metadata"
_COMPONENT_OF_PREFIX = {
    "unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
    "transformer.": "transformer",  # Flux (FluxPipeline.save_lora_weights)
}


def _split_component(name: str) -> tuple[str, str]:
    """("text_encoder", "text_model.encoder…") for a prefixed diffusers name; ("", name) otherwise."""
    for prefix in sorted(_COMPONENT_OF_PREFIX, key=len, reverse=True):
        if name.startswith(prefix):
            return _COMPONENT_OF_PREFIX[prefix], name[len(prefix) :]
    return "", name


def read_adapter_config(path: str, metadata: Mapping[str, str]) -> dict | None:
    """The diffusers ``lora_adapter_metadata`` JSON, or None when the file has none."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise FormatError(
            f"{path}: metadata key '{METADATA_KEY}' is not valid JSON ({error}). It should hold the PEFT "
            "LoraConfig diffusers saved with the LoRA; fix or delete that metadata entry."
        ) from None
    if not isinstance(config, dict):
        raise FormatError(
            f"{path}: metadata key '{METADATA_KEY}' holds {type(config).__name__}, not a JSON object. "
            "It should hold the PEFT LoraConfig diffusers saved with the LoRA; fix or delete it."
        )
    return config


def config_alpha(path: str, config: Mapping | None, name: str, rank: int) -> float | None:
    """PEFT's effective alpha for one module, expressed so that alpha / rank is PEFT's scaling."""
    if config is None:
        return None
    component, relative = _split_component(name)

    def setting(field: str):
        prefixed = f"{component}.{field}" if component else None
        if prefixed is not None and prefixed in config:
            return config[prefixed]
        return config.get(field)

    alpha = setting("lora_alpha")
    for pattern, value in (setting("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", relative):
            alpha = value
            break
    if alpha is None:
        return None
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise FormatError(
            f"{path}: metadata '{METADATA_KEY}' gives lora_alpha {alpha!r} for '{name}', which is not a number. "
            "Fix the value in the metadata."
        ) from None
    if setting("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r); report the alpha that gives that under alpha / r.
        alpha *= math.sqrt(rank)
    return alpha
