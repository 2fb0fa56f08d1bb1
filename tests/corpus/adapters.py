"""Broken and hostile adapters for a tiny SD1 base.

Each case starts from a valid synthetic kohya LoRA (real SD1 key names) and
breaks one thing. ``stage`` says when the refusal comes: "plan" (from the
header alone, so `loraforge plan` reports it too) or "build" (the factor
values, read only when baking).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loraforge.testing.arch import tiny_architecture
from loraforge.formats.safetensors_writer import save_tensors
from loraforge.testing.adapters import adapter_tensors

from . import Case

NAME = "broken-lora.safetensors"
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
Q_DIFFUSERS = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def sd1_lora(rank: int = 4, seed: int = 2) -> dict[str, torch.Tensor]:
    return adapter_tensors(tiny_architecture("sd1"), "lora", rank=rank, seed=seed)


def sdxl_lora() -> dict[str, torch.Tensor]:
    return adapter_tensors(tiny_architecture("sdxl"), "lora", rank=4, seed=5)


def _variant(edit, *fragments: str, stage: str = "plan", notes: str = "") -> Case:
    def make(folder: Path) -> Path:
        tensors = edit(sd1_lora())
        path = Path(folder) / NAME
        save_tensors(path, tensors, {"ss_network_module": "networks.lora"})
        return path

    return Case(make, fragments, "RecipeError" if stage == "plan" else "FormatError", notes, {"stage": stage})


def _replace(**changes):
    def edit(tensors):
        return {**tensors, **{key.replace("__", "."): value for key, value in changes.items()}}

    return edit


def _set(key: str, value: torch.Tensor):
    return lambda tensors: {**tensors, key: value}


def _drop(key: str):
    return lambda tensors: {k: v for k, v in tensors.items() if k != key}


def _poison(key: str, index: int, value: float):
    def edit(tensors):
        poisoned = tensors[key].clone()
        poisoned.view(-1)[index] = value
        return {**tensors, key: poisoned}

    return edit


def _both(*edits):
    def edit(tensors):
        for one in edits:
            tensors = one(tensors)
        return tensors

    return edit


def _mixed_kinds(tensors):
    # The same layer as kohya LoRA and LyCORIS LoHa: two export formats merged by name.
    extra = {f"{Q}.hada_w1_a": torch.zeros(16, 2), f"{Q}.hada_w1_b": torch.zeros(2, 16),
             f"{Q}.hada_w2_a": torch.zeros(16, 2), f"{Q}.hada_w2_b": torch.zeros(2, 16)}
    return {**tensors, **{k: v.half() for k, v in extra.items()}}


def _kohya_and_diffusers_names(tensors):
    # The same layer under its kohya name and its diffusers (PEFT) name: it would be applied twice.
    return {
        **tensors,
        f"{Q_DIFFUSERS}.lora_A.weight": tensors[f"{Q}.lora_down.weight"].clone(),
        f"{Q_DIFFUSERS}.lora_B.weight": tensors[f"{Q}.lora_up.weight"].clone(),
    }


CASES: dict[str, Case] = {
    "mismatched up/down ranks": _variant(
        _set(f"{Q}.lora_up.weight", torch.zeros(16, 3, dtype=torch.float16)), "same rank and must be equal"
    ),
    "wrong shape for the target layer": _variant(
        _both(_set(f"{Q}.lora_up.weight", torch.zeros(24, 4, dtype=torch.float16)),
              _set(f"{Q}.lora_down.weight", torch.zeros(4, 24, dtype=torch.float16))),
        "shapes that do not fit the base", "(24, 24)",
    ),
    "alpha of the wrong shape": _variant(_set(f"{Q}.alpha", torch.ones(4, dtype=torch.float16)), "alpha must be a single 0-d number"),
    "alpha NaN": _variant(_set(f"{Q}.alpha", torch.tensor(math.nan)), "alpha nan, which is not a finite number"),
    "integer factor": _variant(_set(f"{Q}.lora_down.weight", torch.zeros(4, 16, dtype=torch.int32)), "not a floating-point type"),
    "missing half": _variant(_drop(f"{Q}.lora_up.weight"), "lacks its up tensor"),
    "rank 0": _variant(
        _both(_set(f"{Q}.lora_up.weight", torch.zeros(16, 0, dtype=torch.float16)),
              _set(f"{Q}.lora_down.weight", torch.zeros(0, 16, dtype=torch.float16))),
        "rank 0",
    ),
    "mixed formats on one layer": _variant(_mixed_kinds, "mixes keys of several adapter kinds (loha, lora)"),
    "one layer under two namings": _variant(_kohya_and_diffusers_names, "both adapt model.diffusion_model.input_blocks.1.1", "apply it twice"),
    "keys for another architecture": Case(
        lambda folder: (save_tensors(Path(folder) / NAME, sdxl_lora()), Path(folder) / NAME)[1],
        ("Stable Diffusion XL",), "RecipeError", extra={"stage": "plan"},
    ),
    "keys for no layer at all": _variant(
        lambda tensors: {"lora_unet_not_a_layer" + k[len(Q):]: v for k, v in tensors.items() if k.startswith(Q)},
        "no module of 'style'", "its modules match no supported architecture",
    ),
    "NaN in a factor": _variant(
        _poison(f"{Q}.lora_down.weight", 5, math.nan),
        "1 module(s) of adapter 'style' hold NaN or infinite values", f"{Q} ({Q}.lora_down.weight: 1 NaN, 0 inf)",
        stage="build",
    ),
    "Inf in factors of two modules": _variant(
        _both(_poison(f"{Q}.lora_up.weight", 0, math.inf), _poison(f"{K}.lora_up.weight", 3, -math.inf)),
        "2 module(s) of adapter 'style'", f"{K}.lora_up.weight: 0 NaN, 1 inf", f"{Q}.lora_up.weight: 0 NaN, 1 inf",
        stage="build",
    ),
}
