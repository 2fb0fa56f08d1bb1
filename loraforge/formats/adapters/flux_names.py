"""Flux.1 LoRA module names in every dialect in circulation, mapped onto the Flux table.

The table (formats/arch/flux.py) has one row per BFL linear layer, named the
kohya way (``lora_unet_double_blocks_0_img_attn_qkv``) and the ComfyUI way
(``diffusion_model.double_blocks.0.img_attn.qkv``). Files in the wild also
name the layers of diffusers' ``FluxTransformer2DModel``, where the fused BFL
weights are split (diffusers ``convert_flux_transformer_checkpoint_to_diffusers``,
ComfyUI ``flux_to_diffusers``; h = hidden size):

=========================================================  ==========================================  =========
diffusers module                                           BFL weight                                  rows
=========================================================  ==========================================  =========
``transformer_blocks.i.attn.to_q`` / ``to_k`` / ``to_v``   ``double_blocks.i.img_attn.qkv``            0:h / h:2h / 2h:3h
``…attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``     ``double_blocks.i.txt_attn.qkv``            the same
``single_transformer_blocks.i.attn.to_q/to_k/to_v``        ``single_blocks.i.linear1``                 0:h / h:2h / 2h:3h
``single_transformer_blocks.i.proj_mlp``                   ``single_blocks.i.linear1``                 3h:7h
``norm_out.linear``                                        ``final_layer.adaLN_modulation.1``          halves swapped
=========================================================  ==========================================  =========

and one-to-one: ``attn.to_out.0`` = ``img_attn.proj``, ``attn.to_add_out`` =
``txt_attn.proj``, ``ff.net.0.proj`` / ``ff.net.2`` = ``img_mlp.0`` / ``.2``,
``ff_context.*`` = ``txt_mlp.*``, ``norm1.linear`` = ``img_mod.lin``,
``norm1_context.linear`` = ``txt_mod.lin``, single ``proj_out`` = ``linear2``,
``norm.linear`` = ``modulation.lin``; ``x_embedder`` = ``img_in``,
``context_embedder`` = ``txt_in``, ``time_text_embed.{timestep,guidance,
text}_embedder.linear_1/2`` = ``{time,guidance,vector}_in.in_layer/out_layer``,
``proj_out`` = ``final_layer.linear``.

A split module is a row slice of the fused weight (a table row with
``rows``), so q, k and v bake into their rows exactly and a sub-module a file
lacks adds nothing to its rows. ``norm_out.linear``'s ΔW is [scale; shift]
where BFL's weight is [shift; scale] (``swap_scale_shift`` in both
converters): its row has ``swap_halves``.

Dialects (prefix + path; ``_`` for ``.`` in the one-word forms):

* kohya / sd-scripts: ``lora_unet_`` + BFL path (the table's own), text
  encoders ``lora_te1_`` (CLIP-L) and ``lora_te3_`` (T5);
* ComfyUI: ``diffusion_model.`` + BFL path (the table's own), also bare BFL
  paths (BFL's control LoRAs) and ``model.diffusion_model.`` / ``transformer.``
  + BFL path;
* diffusers / PEFT (ai-toolkit, diffusers' trainer, SimpleTuner):
  ``transformer.`` + diffusers path; bare diffusers paths (DiffSynth);
  ``transformer.base_model.model.`` / ``base_model.model.`` (old SimpleTuner
  PEFT); text encoders ``text_encoder.`` (CLIP-L), ``text_encoder_2.`` (T5);
* OneTrainer: ``lora_transformer_`` + diffusers path, T5 as ``lora_te2_``;
* SimpleTuner LyCORIS: ``lycoris_`` + diffusers path;
* XLabs: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}`` (1 = image, 2 = text
  stream) and ``single_blocks.N.processor.{qkv,proj}_lora`` (q, k, v = rows 0:3h
  of ``linear1``; ComfyUI names that slice ``single_blocks.N.linear1_qkv``).
"""

from __future__ import annotations

import dataclasses

from loraforge.formats.arch import Architecture, ModuleSpec
from loraforge.formats.arch.flux import COMFY_PREFIX, KOHYA_PREFIX, MLP_RATIO, TRANSFORMER_PREFIX

from . import aliases

FAMILY = "flux"
DIFFUSERS_PREFIX = "transformer."
ONETRAINER_PREFIX = "lora_transformer_"
LYCORIS_PREFIX = "lycoris_"
_DOTTED_BFL_PREFIXES = ("", COMFY_PREFIX, TRANSFORMER_PREFIX, DIFFUSERS_PREFIX)
_DOTTED_DIFFUSERS_PREFIXES = ("", DIFFUSERS_PREFIX, DIFFUSERS_PREFIX + "base_model.model.", "base_model.model.")
_ONE_WORD_DIFFUSERS_PREFIXES = (ONETRAINER_PREFIX, LYCORIS_PREFIX)
_T5_KOHYA, _T5_ONETRAINER = "lora_te3_", "lora_te2_"

# (diffusers path, BFL path, part) where part is None (whole), an index into the fused
# rows (q, k, v, mlp) or "swap".
_NON_BLOCK = (
    ("x_embedder", "img_in", None),
    ("context_embedder", "txt_in", None),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", None),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", None),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", None),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", None),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", None),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", None),
    ("proj_out", "final_layer.linear", None),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", "swap"),
)
_DOUBLE = (
    ("attn.to_q", "img_attn.qkv", 0), ("attn.to_k", "img_attn.qkv", 1), ("attn.to_v", "img_attn.qkv", 2),
    ("attn.add_q_proj", "txt_attn.qkv", 0), ("attn.add_k_proj", "txt_attn.qkv", 1),
    ("attn.add_v_proj", "txt_attn.qkv", 2),
    ("attn.to_out.0", "img_attn.proj", None), ("attn.to_add_out", "txt_attn.proj", None),
    ("ff.net.0.proj", "img_mlp.0", None), ("ff.net.2", "img_mlp.2", None),
    ("ff_context.net.0.proj", "txt_mlp.0", None), ("ff_context.net.2", "txt_mlp.2", None),
    ("norm1.linear", "img_mod.lin", None), ("norm1_context.linear", "txt_mod.lin", None),
)
_SINGLE = (
    ("attn.to_q", "linear1", 0), ("attn.to_k", "linear1", 1), ("attn.to_v", "linear1", 2),
    ("proj_mlp", "linear1", 3),
    ("proj_out", "linear2", None), ("norm.linear", "modulation.lin", None),
)


def diffusers_layers(arch: Architecture) -> tuple[tuple[str, str, object], ...]:
    """(diffusers path, BFL path, part) of every diffusers layer the table's depths give."""
    dims = dict(arch.dimensions)
    rows = list(_NON_BLOCK)
    for i in range(dims["depth"]):
        rows += [(f"transformer_blocks.{i}.{d}", f"double_blocks.{i}.{b}", part) for d, b, part in _DOUBLE]
    for i in range(dims["depth_single"]):
        rows += [(f"single_transformer_blocks.{i}.{d}", f"single_blocks.{i}.{b}", part) for d, b, part in _SINGLE]
    return tuple(rows)


def _fused_rows(hidden: int, part: int) -> tuple[int, int]:
    """q, k, v: one hidden width each; the MLP part of linear1: MLP_RATIO widths after them."""
    if part < 3:
        return part * hidden, (part + 1) * hidden
    return 3 * hidden, (3 + MLP_RATIO) * hidden


def _slice_spec(spec: ModuleSpec, diffusers_path: str, part, hidden: int) -> ModuleSpec:
    """The table row for a diffusers layer that is part of (or a permutation of) a BFL weight."""
    names = {"kohya": ONETRAINER_PREFIX + diffusers_path.replace(".", "_"), "diffusers": DIFFUSERS_PREFIX + diffusers_path}
    if part is None:
        return spec
    if part == "swap":
        return dataclasses.replace(spec, **names, swap_halves=True)
    rows = _fused_rows(hidden, part)
    return dataclasses.replace(spec, **names, rows=rows, shape=(rows[1] - rows[0],) + tuple(spec.shape[1:]))


def _bfl_path(spec: ModuleSpec) -> str:
    """A transformer row's BFL path: its ComfyUI name without the prefix."""
    return spec.diffusers[len(COMFY_PREFIX):]


def build_table(arch: Architecture) -> dict[str, ModuleSpec]:
    """Every accepted spelling -> table row (split and swapped layers as rows of their own)."""
    table: dict[str, ModuleSpec] = {}

    def add(name: str, spec: ModuleSpec) -> None:
        table.setdefault(name, spec)

    by_bfl: dict[str, ModuleSpec] = {}
    for spec in arch.modules:  # canonical names first
        add(spec.kohya, spec)
        add(spec.diffusers, spec)
        if spec.component == "unet":
            by_bfl[_bfl_path(spec)] = spec
    for path, spec in by_bfl.items():
        for prefix in _DOTTED_BFL_PREFIXES:
            add(prefix + path, spec)
    hidden = dict(arch.dimensions)["hidden"]
    for diffusers_path, bfl_path, part in diffusers_layers(arch):
        spec = by_bfl.get(bfl_path)
        if spec is None:  # guidance_in of a schnell table
            continue
        row = _slice_spec(spec, diffusers_path, part, hidden)
        for prefix in _DOTTED_DIFFUSERS_PREFIXES:
            add(prefix + diffusers_path, row)
        for prefix in _ONE_WORD_DIFFUSERS_PREFIXES:
            add(prefix + diffusers_path.replace(".", "_"), row)
    _add_xlabs(add, by_bfl, arch, hidden)
    for spec in arch.modules:
        if spec.component == "unet":
            continue
        kohya_names, diffusers_names = aliases.spellings(spec, arch)
        for name in kohya_names + diffusers_names:
            add(name, spec)
        if spec.kohya.startswith(_T5_KOHYA):  # OneTrainer writes T5 as lora_te2_
            add(_T5_ONETRAINER + spec.kohya[len(_T5_KOHYA):], spec)
    return table


def _add_xlabs(add, by_bfl: dict[str, ModuleSpec], arch: Architecture, hidden: int) -> None:
    """XLabs (``double_blocks.N.processor.{qkv,proj}_lora{1,2}``, ``single_blocks.N.processor.{qkv,proj}_lora``)
    and ComfyUI's ``single_blocks.N.linear1_qkv``: q, k and v of ``linear1`` are its rows 0:3h.

    The mapping is diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` (lora1 = image stream,
    lora2 = text stream; single ``qkv_lora`` -> to_q/to_k/to_v, ``proj_lora`` -> proj_out).
    """
    dims = dict(arch.dimensions)
    for i in range(dims["depth"]):
        for xlabs, bfl in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                           ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")):
            for prefix in ("", COMFY_PREFIX):
                add(f"{prefix}double_blocks.{i}.processor.{xlabs}", by_bfl[f"double_blocks.{i}.{bfl}"])
    for i in range(dims["depth_single"]):
        linear1 = by_bfl[f"single_blocks.{i}.linear1"]
        qkv = dataclasses.replace(
            linear1, kohya=f"{KOHYA_PREFIX}single_blocks_{i}_linear1_qkv", diffusers=f"{COMFY_PREFIX}single_blocks.{i}.linear1_qkv",
            rows=(0, 3 * hidden), shape=(3 * hidden,) + tuple(linear1.shape[1:]),
        )
        for prefix in ("", COMFY_PREFIX):
            add(f"{prefix}single_blocks.{i}.processor.qkv_lora", qkv)
            add(f"{prefix}single_blocks.{i}.processor.proj_lora", by_bfl[f"single_blocks.{i}.linear2"])
            add(f"{prefix}single_blocks.{i}.linear1_qkv", qkv)
        add(qkv.kohya, qkv)


_TABLES: dict[tuple, dict[str, ModuleSpec]] = {}


def lookup(name: str, arch: Architecture) -> ModuleSpec | None:
    """The table row an adapter module name stands for on a Flux architecture, in any dialect."""
    key = (arch.name, arch.dimensions, len(arch.modules))
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = build_table(arch)
    return table.get(name)


def dialect(names: list[str]) -> str:
    """The dialect a set of module names is written in (for ``inspect``): the first that names most."""
    votes = {
        "kohya": sum(n.startswith(KOHYA_PREFIX) or n.startswith(("lora_te1_", _T5_KOHYA)) for n in names),
        "comfyui": sum(n.startswith(COMFY_PREFIX) for n in names),
        "bfl": sum(n.startswith(("double_blocks.", "single_blocks.", "final_layer.")) and ".processor." not in n
                   for n in names),
        "diffusers": sum(n.startswith((DIFFUSERS_PREFIX, "transformer_blocks.", "single_transformer_blocks.",
                                       "text_encoder")) for n in names),
        "onetrainer": sum(n.startswith(ONETRAINER_PREFIX) for n in names),
        "simpletuner-lycoris": sum(n.startswith(LYCORIS_PREFIX) for n in names),
        "xlabs": sum(".processor." in n for n in names),
    }
    best = max(votes.values(), default=0)
    return next((name for name, count in votes.items() if count == best), "") if best else ""
