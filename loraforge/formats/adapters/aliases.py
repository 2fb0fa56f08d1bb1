"""Every spelling of a module name that tools in circulation write, mapped onto the architecture table.

The table (formats/arch) gives each LoRA target one kohya name and one
diffusers name. Files in the wild also use:

* text-encoder paths without the ``text_model`` level: transformers ≥ 5's
  ``CLIPTextModel`` has no ``text_model`` submodule, so PEFT writes
  ``text_encoder.encoder.layers.0.self_attn.q_proj`` and kohya-style tools
  ``lora_te_encoder_layers_0_self_attn_q_proj`` (diffusers accepts both);
* ``lora_te1_`` for the one text encoder of SD 1.x/2.x (diffusers' kohya
  converter, ``convert_state_dict_to_kohya``, always writes ``lora_te1``);
* kohya UNet names in the other naming: diffusers paths on SDXL
  (``lora_unet_down_blocks_1_attentions_0_…``, written by tools that train on
  diffusers' UNet: diffusers' kohya converter, LyCORIS on a diffusers model)
  and LDM paths on SD 1.x/2.x (``lora_unet_input_blocks_1_1_…``).

All are aliases of the same table rows, so a file in any of these spellings
bakes exactly like one in the canonical names. Two modules of one file that
land on the same layer through different spellings are refused by the
planner (the layer would be applied twice).
"""

from __future__ import annotations

from loraforge.formats.arch import Architecture, ModuleSpec
from loraforge.formats.arch.unet import DIFFUSERS_UNET_PREFIX, KOHYA_UNET_PREFIX, UNET_PREFIX

_TEXT_MODEL = "text_model"
_ONE_ENCODER_KOHYA = ("lora_te_", "lora_te1_")  # diffusers' converter writes te1 for SD 1.x/2.x too


def lookup(name: str, naming: str, arch: Architecture) -> ModuleSpec | None:
    """The table row ``name`` (an adapter module name of ``naming`` "kohya" or "diffusers") stands for."""
    kohya, diffusers = _tables(arch)
    if naming == "kohya":
        return kohya.get(name)
    spec = diffusers.get(name)
    if spec is None and not any(name.startswith(p) for p in _diffusers_prefixes(arch)):
        spec = diffusers.get(DIFFUSERS_UNET_PREFIX + name)
    return spec


def spellings(spec: ModuleSpec, arch: Architecture) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(kohya names, diffusers names) accepted for ``spec``, canonical first."""
    kohya = [spec.kohya]
    diffusers = [spec.diffusers]
    if spec.component == "unet":
        path = spec.diffusers[len(DIFFUSERS_UNET_PREFIX):]
        ldm = spec.key[len(UNET_PREFIX):].removesuffix(".weight")
        kohya += [KOHYA_UNET_PREFIX + path.replace(".", "_"), KOHYA_UNET_PREFIX + ldm.replace(".", "_")]
    else:
        prefix, path = _split_text_encoder(spec.kohya, spec.diffusers)
        short = path.removeprefix(_TEXT_MODEL + ".")
        dotted_prefix = spec.diffusers[: len(spec.diffusers) - len(path)]
        diffusers.append(dotted_prefix + short)
        kohya_prefixes = [prefix]
        if prefix in _ONE_ENCODER_KOHYA and _one_text_encoder(arch):
            kohya_prefixes = list(_ONE_ENCODER_KOHYA)
        for kp in kohya_prefixes:
            kohya += [kp + path.replace(".", "_"), kp + short.replace(".", "_")]
    return tuple(dict.fromkeys(kohya)), tuple(dict.fromkeys(diffusers))


def _split_text_encoder(kohya: str, diffusers: str) -> tuple[str, str]:
    """(kohya prefix, dotted module path) of a text-encoder row: ("lora_te1_", "text_model.encoder…")."""
    component, _, path = diffusers.partition(".")
    underscored = path.replace(".", "_")
    return kohya[: len(kohya) - len(underscored)], path


def _one_text_encoder(arch: Architecture) -> bool:
    return len({m.component for m in arch.modules if m.is_text_encoder}) == 1


def _diffusers_prefixes(arch: Architecture) -> tuple[str, ...]:
    return tuple(sorted({m.diffusers.partition(".")[0] + "." for m in arch.modules}))


_TABLES: dict[tuple, tuple[dict[str, ModuleSpec], dict[str, ModuleSpec]]] = {}


def _tables(arch: Architecture) -> tuple[dict[str, ModuleSpec], dict[str, ModuleSpec]]:
    """(kohya name -> row, diffusers name -> row), aliases included; one pair per family and dimensions."""
    key = (arch.name, arch.dimensions, len(arch.modules))
    tables = _TABLES.get(key)
    if tables is None:
        tables = _TABLES[key] = _build_tables(arch)
    return tables


def _build_tables(arch: Architecture) -> tuple[dict[str, ModuleSpec], dict[str, ModuleSpec]]:
    kohya: dict[str, ModuleSpec] = {}
    diffusers: dict[str, ModuleSpec] = {}
    # Canonical names first, so an alias never shadows another module's own name.
    for spec in arch.modules:
        kohya.setdefault(spec.kohya, spec)
        diffusers.setdefault(spec.diffusers, spec)
    for spec in arch.modules:
        kohya_names, diffusers_names = spellings(spec, arch)
        for alias in kohya_names:
            kohya.setdefault(alias, spec)
        for alias in diffusers_names:
            diffusers.setdefault(alias, spec)
    return kohya, diffusers
