"""The output checkpoint's tensor layout, derived from the base's header.

Output tensors keep the base's order and names. Floating-point tensors,
float8 included, are saved in the recipe's save dtype (``same`` keeps each
base dtype; float8 widens exactly to any of float16, bfloat16, float32);
integer and boolean tensors are never converted. A tensor that no adapter
touches and whose dtype does not change is copied byte for byte.

A ComfyUI scaled-fp8 base (``<module>.scale_weight`` next to an F8_E4M3
``<module>.weight``; loraforge/ops/fp8.py) is laid out by
:func:`output_layout` with ``scaled``: under ``save: same`` a baked weight
stays F8_E4M3 and its ``scale_weight`` is rewritten (action ``scale``; the
base's value unless the baked values need a larger one); under a float save
dtype every scaled weight is dequantised into it (baked, or action
``dequantise``) and the ``scale_weight``/``scale_input`` tensors and the
``scaled_fp8`` marker are left out, so the output is a plain checkpoint that
every loader reads as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Collection, Mapping

from loraforge.formats.dtypes import itemsize
from loraforge.formats.safetensors_reader import SafetensorsFile
from loraforge.text import listing

CONVERTIBLE = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
NARROW = ("F8_E4M3", "F8_E5M2")  # 3 and 2 mantissa bits: most of a LoRA's change rounds away in them


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    action: str  # "copy" (bytes unchanged) | "convert" (dtype only) | "bake" (weights change)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * itemsize(self.dtype)


def output_dtype(base_dtype: str, save: str) -> str:
    return save if save != "same" and base_dtype in CONVERTIBLE else base_dtype


def output_layout(base: SafetensorsFile, save: str, baked: Collection[str] = (),
                  scaled: Mapping[str, str] | None = None) -> list[OutputTensor]:
    """Every output tensor in base order; ``scaled`` (:func:`scaled_weights`) lays out a scaled-fp8 base."""
    if scaled:
        return _scaled_layout(base, save, baked, scaled)
    layout = []
    for name in base.names():
        info = base.info(name)
        dtype = output_dtype(info.dtype, save)
        if name in baked:
            action = "bake"
        else:
            action = "copy" if dtype == info.dtype else "convert"
        layout.append(OutputTensor(name, dtype, tuple(info.shape), action))
    return layout


def check_narrow_bake(loaded, name: str, base: SafetensorsFile, save: str, baked: Collection[str]) -> None:
    """Refuse a bake that would save baked weights in float8 (``save: same`` on a float8 base).

    float8 keeps 3 (E4M3) or 2 (E5M2) mantissa bits: a LoRA's change below
    1/16 (1/8) of a weight rounds back to the weight, so most of a typical
    LoRA's effect would vanish from the file without a word. Any float
    ``save:`` dtype widens float8 exactly and keeps the change.
    """
    scaled = scaled_weights(base)  # requantised with their scale under `save: same` (ops/fp8.py), not refused
    narrow = sorted(key for key in baked if key in base and key not in scaled and output_dtype(base.info(key).dtype, save) in NARROW)
    if not narrow:
        return
    dtypes = "/".join(sorted({base.info(key).dtype for key in narrow}))
    raise loaded.error(
        ("targets", name),
        f"target '{name}' bakes into {len(narrow)} float8 ({dtypes}) weights of its base (e.g. {narrow[0]}) and, with "
        "`save: same`, would save them in float8, where a change smaller than 1/16 of a weight rounds away: most of "
        "the LoRAs' effect would be lost.",
        "Set `precision: {save: bfloat16}` (or float16) on the target or the recipe; float8 weights widen to it exactly.",
    )


SCALE_WEIGHT_SUFFIX = ".scale_weight"  # ComfyUI "scaled fp8": weight = stored fp8 value x this per-tensor scale
SCALE_INPUT_SUFFIX = ".scale_input"  # ComfyUI: the activation scale of fp8 matrix multiplication (not the weight's)
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker tensor (its dtype names the fp8 format), maybe prefixed


def scaled_weights(base: SafetensorsFile) -> dict[str, str]:
    """Weight key -> its ``scale_weight`` key, for every weight of ``base`` stored with a per-tensor scale."""
    found = {}
    for key in base.names():
        if key.endswith(SCALE_WEIGHT_SUFFIX):
            weight = key[: -len(SCALE_WEIGHT_SUFFIX)] + ".weight"
            if weight in base:
                found[weight] = key
    return found


def is_scale_tensor(key: str) -> bool:
    """A tensor that only a scaled-fp8 loader reads: a scale, an input scale or the marker."""
    return key.endswith((SCALE_WEIGHT_SUFFIX, SCALE_INPUT_SUFFIX)) or key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER)


def _scaled_layout(base: SafetensorsFile, save: str, baked: Collection[str], scaled: Mapping[str, str]) -> list[OutputTensor]:
    rescaled = {scale for weight, scale in scaled.items() if weight in baked}
    layout = []
    for name in base.names():
        info = base.info(name)
        shape = tuple(info.shape)
        if save != "same" and is_scale_tensor(name):
            continue  # dequantised output: no loader may scale it again
        if save == "same" and name in rescaled:
            layout.append(OutputTensor(name, info.dtype, shape, "scale"))
            continue
        dtype = output_dtype(info.dtype, save)
        if name in baked:
            action = "bake"
        elif name in scaled and save != "same":
            action = "dequantise"
        else:
            action = "copy" if dtype == info.dtype else "convert"
        layout.append(OutputTensor(name, dtype, shape, action))
    return layout


def check_scaled_bake(loaded, name: str, base: SafetensorsFile, save: str, baked: Collection[str]) -> None:
    """Under `save: same`, refuse a baked scaled weight loraforge cannot requantise exactly: it handles F8_E4M3
    weights with a one-element float32 scale (what ComfyUI's scaled fp8 writes). Dequantising needs neither."""
    if save != "same":
        return
    scaled = scaled_weights(base)
    odd = sorted(weight for weight in baked if weight in scaled and (
        base.info(weight).dtype != "F8_E4M3" or base.info(scaled[weight]).dtype != "F32"
        or prod(base.info(scaled[weight]).shape) != 1))
    if odd:
        weight, scale = base.info(odd[0]), base.info(scaled[odd[0]])
        raise loaded.error(
            ("targets", name, "base"),
            f"target '{name}' would requantise {len(odd)} scaled weight(s) of its base that are not F8_E4M3 with a "
            f"float32 scalar scale (e.g. {odd[0]}: {weight.dtype}, scale {scale.dtype} {list(scale.shape)}); "
            "loraforge requantises ComfyUI's scaled fp8 (F8_E4M3 weights, float32 scale_weight) only.",
            "Set `precision: {save: bfloat16}` (or float16, float32): the weights are then dequantised into that "
            "dtype and the scales left out.",
        )


def check_baked_keys(loaded, name: str, base: SafetensorsFile, applications) -> None:
    """Refuse, at plan time, adapter modules aimed at weights the base file does not hold.

    Matching uses the family's full table, so a base without a text encoder (a
    UNet-only file) still "matches" a LoRA's text-encoder modules; the bake then
    found the tensor missing and blamed a base "changed since planning".
    """
    missing = sorted(key for key in applications if key not in base)
    if not missing:
        return
    spec = loaded.recipe.targets[name]
    users = sorted({spec.loras[a.ingredient].use for key in missing for a in applications[key]})
    text_encoder = all(a.spec.is_text_encoder for key in missing for a in applications[key])
    why = " (the base has no text encoder)" if text_encoder else ""
    hint = ("set `te: 0` on those LoRA uses to skip their text-encoder modules, or use a base that has a text encoder"
            if text_encoder else "check that the base is the full checkpoint the LoRAs were made for")
    raise loaded.error(
        ("targets", name, "base"),
        f"{len(missing)} weight(s) that {', '.join(repr(u) for u in users)} adapt are not in the base file{why}: "
        f"{listing(missing)}.",
        hint[0].upper() + hint[1:] + ".",
    )
