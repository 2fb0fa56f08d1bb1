"""The output checkpoint's tensor layout, derived from the base's header.

Output tensors keep the base's order and names. Floating-point tensors,
float8 included, are saved in the recipe's save dtype (``same`` keeps each
base dtype; float8 widens exactly to any of float16, bfloat16, float32);
integer and boolean tensors are never converted. A tensor that no adapter
touches and whose dtype does not change is copied byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Collection

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


def output_layout(base: SafetensorsFile, save: str, baked: Collection[str] = ()) -> list[OutputTensor]:
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
    _refuse_scaled_weights(loaded, name, base, baked)
    narrow = sorted(key for key in baked if key in base and output_dtype(base.info(key).dtype, save) in NARROW)
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


def _refuse_scaled_weights(loaded, name: str, base: SafetensorsFile, baked: Collection[str]) -> None:
    """Refuse a bake into weights stored with a per-tensor scale (ComfyUI scaled fp8, e.g. Flux fp8_scaled).

    Adding ΔW to the stored values would change the weight by ΔW·scale, not ΔW; until the bake
    dequantises them, saying so beats writing a silently wrong file.
    """
    scaled = sorted(key for key in baked if key.endswith(".weight")
                    and key[: -len(".weight")] + SCALE_WEIGHT_SUFFIX in base)
    if not scaled:
        return
    raise loaded.error(
        ("targets", name, "base"),
        f"target '{name}' bakes into {len(scaled)} weight(s) of its base that are stored scaled (ComfyUI scaled fp8: "
        f"the real weight is the stored value times {scaled[0][: -len('.weight')]}{SCALE_WEIGHT_SUFFIX}, e.g. for "
        f"{scaled[0]}); loraforge does not dequantise those yet, and adding the LoRAs to the stored values would "
        "scale their change by the per-tensor scale.",
        "Use a bf16 (or plain fp8) release of the base, or convert the base to bf16 first (each weight times its "
        "scale_weight, the scale tensors dropped).",
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
