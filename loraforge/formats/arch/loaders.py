"""Which common LoRA loaders apply a module of a family's table, and which skip it silently.

A loader that meets a module it has no layer for logs a line (or nothing) and
goes on, so a published LoRA can lose layers without anyone noticing. What each
loader applies is a fact about the family's module table and about the spelling
of the module's name in the file; the facts, with the loader source they come
from, are in docs/adapters.md ("What loaders skip"). Only skips read in the
loaders' source are reported: an empty list means "no known skip", and a family
whose loaders were not checked (Flux) has no list at all (:func:`known`).

* ``kohya``: kohya-ss sd-scripts' ``networks/merge_lora.py`` (and
  ``sdxl_merge_lora.py``, ``LoRANetwork``): only Linear/Conv2d children of
  Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D (UNet) and
  CLIPAttention, CLIPMLP (text encoders), named ``lora_unet_…``/``lora_te…_``
  with ``lora_down``/``lora_up`` factors.
* ``a1111``: AUTOMATIC1111's ``extensions-builtin/Lora/networks.py``.
* ``comfyui``: ComfyUI's ``comfy/lora.py`` key maps.
* ``diffusers``: ``load_lora_weights`` (``lora_conversion_utils.py`` for kohya names).
"""

from __future__ import annotations

from collections.abc import Iterable

from .table import ModuleSpec

# (id, what it stands for), in report order
LOADERS: tuple[tuple[str, str], ...] = (
    ("kohya", "kohya merge_lora"),
    ("a1111", "A1111"),
    ("comfyui", "ComfyUI"),
    ("diffusers", "diffusers"),
)
LOADER_IDS: tuple[str, ...] = tuple(loader for loader, _ in LOADERS)
# Families whose loader facts were read in the loaders' source (docs/adapters.md).
KNOWN_FAMILIES = frozenset({"sd1", "sd2", "sdxl"})
# UNet layers outside kohya's four target module classes (diffusers names, without "unet.").
_KOHYA_UNET_OUTSIDE = ("conv_in", "conv_out", "time_embedding.", "add_embedding.", "class_embedding.")
# Text-encoder layers inside CLIPAttention / CLIPMLP.
_KOHYA_TEXT_ENCODER_INSIDE = (".self_attn.", ".mlp.")
# Diffusers/PEFT spellings of UNet attention projections that ComfyUI maps only as ".processor.to_*".
_ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")


def known(family: str) -> bool:
    """Whether loader coverage is known for this family (``modules: kohya`` is allowed, skips are listed)."""
    return family in KNOWN_FAMILIES


def kohya_applies(spec: ModuleSpec) -> bool:
    """Whether kohya's merge_lora has a layer for this module of an SD 1.x/2.x/SDXL table.

    This is the set ``modules: kohya`` keeps: every loader of :data:`LOADERS` applies it.
    """
    path = spec.diffusers.split(".", 1)[1] if "." in spec.diffusers else spec.diffusers
    if spec.is_text_encoder:
        return any(part in "." + path for part in _KOHYA_TEXT_ENCODER_INSIDE)
    return not any(path == prefix or path.startswith(prefix) for prefix in _KOHYA_UNET_OUTSIDE)


def skipped_by(
    family: str, spec: ModuleSpec, written: str | None = None, *, naming: str = "kohya", kohya_factors: bool = True
) -> tuple[str, ...]:
    """The loaders known to skip this module, in :data:`LOADERS` order (() for a family not :func:`known`).

    ``written`` is the module's name as the file spells it (default: the kohya name loraforge writes),
    ``naming`` its style ("kohya" or "diffusers"), ``kohya_factors`` whether it is a LoRA stored as
    ``lora_down``/``lora_up`` (the only factors kohya's merge_lora reads).
    """
    if not known(family):
        return ()
    written = spec.kohya if written is None else written
    skips = []
    if not (kohya_applies(spec) and naming == "kohya" and written == spec.kohya and kohya_factors):
        skips.append("kohya")
    if _comfyui_misses(spec, written, naming):
        skips.append("comfyui")
    return tuple(skips)


def _comfyui_misses(spec: ModuleSpec, written: str, naming: str) -> bool:
    """ComfyUI's key maps lack this spelling (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip)."""
    if spec.is_text_encoder:  # mapped only as lora_te*_text_model_… and text_encoder(_2).text_model.…
        return "text_model" not in written
    return naming != "kohya" and written.endswith(_ATTENTION_PROJECTIONS) and ".processor." not in written


def loader_skips(family: str, modules: Iterable[tuple[str, tuple[str, ...]]]) -> dict[str, list[str]] | None:
    """{loader: [module names it skips, sorted]} for every loader; None where the family is not known.

    ``modules`` are (name as written, skipped_by(...)) pairs.
    """
    if not known(family):
        return None
    skips: dict[str, list[str]] = {loader: [] for loader in LOADER_IDS}
    for name, loaders in modules:
        for loader in loaders:
            skips[loader].append(name)
    return {loader: sorted(names) for loader, names in skips.items()}


def skips_text(skips: dict[str, list[str]] | None) -> str:
    """One line for plan/inspect: ``kohya merge_lora skips 2 (lora_unet_conv_in, …)``, or why there is none."""
    if skips is None:
        return "which modules common loaders skip is not known for this model family"
    named = [(loader, names) for loader, names in skips.items() if names]
    if not named:
        return "no module is known to be skipped by kohya, A1111, ComfyUI or diffusers"
    parts = []
    for loader, names in named:
        shown = ", ".join(names[:4]) + (f", and {len(names) - 4} more" if len(names) > 4 else "")
        parts.append(f"{dict(LOADERS)[loader]} skips {len(names)} ({shown})")
    return "; ".join(parts)
