"""Writing kohya LoRA / LoCon files, and describing them before they exist.

Input: one :class:`LoraModuleFactors` per adapted layer, keyed by its kohya
module name (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``/``lora_te2_…``),
with ``up`` (out×k) and ``down`` (k×in·kh·kw) matrices whose product is the
layer's whole ΔW. Output tensors, by the names A1111, ComfyUI and kohya read:

* ``<name>.lora_up.weight``: [out, k] for a linear layer, [out, k, 1, 1] for a conv;
* ``<name>.lora_down.weight``: [k, in] or [k, in, kh, kw];
* ``<name>.alpha``: 0-d, equal to k, so the reader's scale alpha/k is exactly 1.

``format: diffusers`` (:data:`FORMATS`) writes the same factors by diffusers/PEFT
names instead: ``<module>.lora_A.weight`` (down) and ``<module>.lora_B.weight``
(up), ``<module>`` being the diffusers module with its component prefix
(``unet.``, ``text_encoder.``, ``text_encoder_2.``; Flux ``transformer.`` +
the diffusers path). A fused BFL weight is written as the diffusers modules it
is split into (:func:`diffusers_parts`): each gets the same lora_A and the
fused lora_B's rows of its slice (``norm_out.linear`` its halves swapped). No
alpha is written, neither as a tensor nor in ``lora_adapter_metadata``: alpha
= rank everywhere, i.e. scale 1, which is what PEFT readers assume without a
config (diffusers 0.42.1 ``get_peft_kwargs`` mirrors mixed ranks into
``alpha_pattern``; ComfyUI applies alpha = rank when a module has no alpha).

Tensors are sorted by name (all of one dtype, so this is also the order
``safetensors.save_file`` would use) and metadata keys are sorted; nothing
depends on the clock, so the same factors give the same bytes. The hashes that
depend on the data (``sshs_model_hash``, ``modelspec.hash_sha256``) are filled
in by the writer after the data is written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from loraforge.formats import dtypes
from loraforge.formats.adapters.kinds import describe_kind
from loraforge.formats.adapters.model import AdapterFile, AdapterModule
from loraforge.formats.arch.table import Architecture
from loraforge.formats.hashing import modelspec_hash
from loraforge.formats.metadata import HASH_KEY, checkpoint_metadata
from loraforge.formats.safetensors_writer import SafetensorsWriter, TensorPlan, WriteResult

NETWORK_MODULE = "networks.lora"  # the default; a family may name its own (Flux: networks.lora_flux)
SSHS_KEY = "sshs_model_hash"
SSHS_PLACEHOLDER = "0" * 64
DYNAMIC = "Dynamic"  # what kohya's resize script writes for ss_network_dim/alpha when ranks differ
SUFFIXES = {"up": "lora_up.weight", "down": "lora_down.weight", "alpha": "alpha"}
PEFT_SUFFIXES = {"down": "lora_A.weight", "up": "lora_B.weight"}
FORMATS = ("kohya", "diffusers")  # the recipe's ``format:`` on kind lora / extract; kohya is the default


@dataclass(frozen=True)
class OutputPart:
    """One diffusers module a kohya module is written as: its name, its rows of the up factor, swapped halves."""

    name: str
    rows: tuple[int, int] | None
    swap_halves: bool = False


_PARTS: dict[tuple, dict[str, tuple[OutputPart, ...]]] = {}


def diffusers_parts(arch: Architecture, kohya_name: str) -> tuple[OutputPart, ...]:
    """The diffusers modules that hold the kohya module ``kohya_name`` of ``arch``, in row order."""
    key = (arch.name, arch.dimensions, len(arch.modules))
    table = _PARTS.get(key)
    if table is None:
        table = _PARTS[key] = _parts_table(arch)
    try:
        return table[kohya_name]
    except KeyError:
        raise ValueError(f"{kohya_name} is not a module of the {arch.title} table") from None


def _parts_table(arch: Architecture) -> dict[str, tuple[OutputPart, ...]]:
    table = {spec.kohya: (OutputPart(spec.diffusers, None),) for spec in arch.modules}
    if arch.name != "flux":
        return table
    from loraforge.formats.adapters import flux_names  # the Flux dialect table (BFL weight -> diffusers layers)

    by_bfl: dict[str, list[OutputPart]] = {}
    hidden = dict(arch.dimensions)["hidden"]
    for path, bfl, part in flux_names.diffusers_layers(arch):
        rows = None if part in (None, "swap") else flux_names._fused_rows(hidden, part)
        by_bfl.setdefault(bfl, []).append(OutputPart(flux_names.DIFFUSERS_PREFIX + path, rows, part == "swap"))
    prefix = flux_names.COMFY_PREFIX
    for spec in arch.modules:
        if spec.component == "unet" and spec.diffusers.startswith(prefix):
            parts = by_bfl.get(spec.diffusers[len(prefix):])
            if parts:
                table[spec.kohya] = tuple(parts)
    return table


def written_skips(arch: Architecture, modules, format: str):
    """(name as written, loaders known to skip it) for each (kohya name, table row) of an output in ``format``.

    In diffusers names kohya's merge_lora reads nothing, and ComfyUI lacks the PEFT spelling of SD
    attention projections (formats/arch/loaders.py; docs/adapters.md, "What loaders skip").
    """
    from loraforge.formats.arch import loaders

    for kohya_name, spec in modules:
        if format != "diffusers":
            yield kohya_name, loaders.skipped_by(arch.name, spec)
            continue
        for part in diffusers_parts(arch, kohya_name):
            yield part.name, loaders.skipped_by(arch.name, spec, part.name, naming="diffusers", kohya_factors=False)


def _part_shape(weight_shape: Sequence[int], part: OutputPart) -> tuple[int, ...]:
    if part.rows is None:
        return tuple(weight_shape)
    return (part.rows[1] - part.rows[0], *weight_shape[1:])


@dataclass(frozen=True)
class LoraModuleFactors:
    """One output module: ΔW (shaped ``weight_shape``) = up @ down, viewed as matrices."""

    name: str  # kohya module name
    up: Tensor  # (out, k)
    down: Tensor  # (k, in·kh·kw)
    weight_shape: tuple[int, ...]  # the adapted weight (or row slice): (out, in) or (out, in, kh, kw)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def is_conv_shape(weight_shape: Sequence[int]) -> bool:
    """A k×k conv (k > 1): the layers kohya counts under conv_dim. 1×1 convs count as linear."""
    return len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)


def factor_shapes(weight_shape: Sequence[int], rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes of a module's up, down and alpha tensors for a weight shape and rank."""
    out, cin, *kernel = (int(d) for d in weight_shape)
    if kernel:
        return {"up": (out, rank, 1, 1), "down": (rank, cin, *kernel), "alpha": ()}
    return {"up": (out, rank), "down": (rank, cin), "alpha": ()}


def module_tensors(module: LoraModuleFactors, dtype: torch.dtype) -> dict[str, Tensor]:
    """The three tensors of one module in ``dtype``, by full key."""
    shapes = factor_shapes(module.weight_shape, module.rank)
    if module.up.shape[0] != shapes["up"][0] or module.down.reshape(module.rank, -1).shape[1] != math.prod(shapes["down"][1:]):
        raise ValueError(
            f"{module.name}: factors {tuple(module.up.shape)} @ {tuple(module.down.shape)} do not make a "
            f"weight of shape {module.weight_shape}"
        )
    return {
        f"{module.name}.{SUFFIXES['up']}": module.up.to(dtype).reshape(shapes["up"]).contiguous(),
        f"{module.name}.{SUFFIXES['down']}": module.down.to(dtype).reshape(shapes["down"]).contiguous(),
        f"{module.name}.{SUFFIXES['alpha']}": torch.tensor(float(module.rank), dtype=dtype),
    }


def diffusers_module_tensors(module: LoraModuleFactors, dtype: torch.dtype, arch: Architecture) -> dict[str, Tensor]:
    """The lora_A / lora_B tensors of one module's diffusers parts in ``dtype``, by full key."""
    kohya = module_tensors(module, dtype)
    up = kohya[f"{module.name}.{SUFFIXES['up']}"]
    down = kohya[f"{module.name}.{SUFFIXES['down']}"]
    tensors: dict[str, Tensor] = {}
    for part in diffusers_parts(arch, module.name):
        rows = up if part.rows is None else up[part.rows[0] : part.rows[1]]
        if part.swap_halves:
            half = rows.shape[0] // 2
            rows = torch.cat((rows[half:], rows[:half]))
        tensors[f"{part.name}.{PEFT_SUFFIXES['up']}"] = rows.contiguous()
        tensors[f"{part.name}.{PEFT_SUFFIXES['down']}"] = down
    return tensors


# --------------------------------------------------------------------------- metadata


def _dim_text(ranks: set[int]) -> str:
    return str(next(iter(ranks))) if len(ranks) == 1 else DYNAMIC


def lora_metadata(
    arch: Architecture,
    ranks: Mapping[str, tuple[int, bool]],
    *,
    title: str,
    date: str | None,
    merged_from: Sequence[str],
    provenance: Mapping[str, str],
) -> dict[str, str]:
    """kohya ``ss_*`` keys, ModelSpec keys (architecture ``<base>/lora``) and provenance, sorted.

    ``ranks`` maps each module name to (rank, is k×k conv). Alpha equals rank
    everywhere, so ``ss_network_alpha`` repeats ``ss_network_dim``; both read
    "Dynamic" when modules differ, as kohya's resize script writes them.
    """
    metadata = checkpoint_metadata(arch, title=title, date=date, merged_from=merged_from, provenance=provenance)
    metadata["modelspec.architecture"] = f"{arch.modelspec_architecture}/lora"
    linear = {rank for rank, conv in ranks.values() if not conv}
    conv = {rank for rank, conv in ranks.values() if conv}
    dim = _dim_text(linear or conv) if ranks else "0"
    metadata.update(
        {
            "ss_network_module": arch.ss_network_module,
            "ss_network_dim": dim,
            "ss_network_alpha": dim,
            "ss_base_model_version": arch.ss_base_model_version,
            "ss_v2": str(arch.ss_v2),
            SSHS_KEY: SSHS_PLACEHOLDER,
        }
    )
    if conv:
        conv_dim = _dim_text(conv)
        metadata["ss_network_args"] = json.dumps({"conv_alpha": conv_dim, "conv_dim": conv_dim}, sort_keys=True)
    return dict(sorted(metadata.items()))


# --------------------------------------------------------------------------- writing


def lora_save_dtype(save: str, factor_dtypes: Sequence[str]) -> str:
    """The output dtype code: the recipe's save dtype, or for "same" the inputs' factor dtype.

    "same" keeps F16, BF16 or F32 when every input factor has it; mixed inputs
    (and F64 ones) are saved as F32, which holds F16 and BF16 values exactly.
    """
    if save != "same":
        return save
    kinds = set(factor_dtypes)
    if len(kinds) == 1 and next(iter(kinds)) in ("F16", "BF16", "F32"):
        return next(iter(kinds))
    return "F32"


def write_lora(
    path: str | os.PathLike[str],
    modules: Sequence[LoraModuleFactors],
    metadata: Mapping[str, str],
    dtype: str,
    *,
    format: str = "kohya",
    arch: Architecture | None = None,
) -> WriteResult:
    """Write ``modules`` to ``path`` atomically; ``metadata`` comes from :func:`lora_metadata`.

    Tensors are written in name order whatever order the modules are given in.
    ``format`` "diffusers" writes PEFT names (needs ``arch``, the modules' table).
    """
    torch_dtype = dtypes.torch_dtype(dtype)
    tensors: dict[str, Tensor] = {}
    for module in sorted(modules, key=lambda m: m.name):
        if format == "diffusers":
            tensors.update(diffusers_module_tensors(module, torch_dtype, arch))
        else:
            tensors.update(module_tensors(module, torch_dtype))
    order = sorted(tensors)
    plan = [TensorPlan.of(name, tensors[name]) for name in order]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    deferred = {key: fill for key, fill in ((HASH_KEY, modelspec_hash), (SSHS_KEY, lambda h: h)) if key in metadata}
    with SafetensorsWriter(path, plan, metadata, deferred_keys=tuple(deferred)) as writer:
        for name in order:
            writer.write(name, tensors[name])
        return writer.commit(deferred_metadata=deferred or None)


# --------------------------------------------------------------------------- planning


def planned_lora_adapter(
    path: str | os.PathLike[str],
    modules: Sequence[tuple[str, tuple[int, ...], int]],
    *,
    format: str = "kohya",
    arch: Architecture | None = None,
) -> AdapterFile:
    """What parse_adapter will find in a LoRA this module writes, known before it is written.

    ``modules``: (kohya name, weight shape, rank) per module. For a policy whose
    ranks depend on the data (energy, ratio) pass its upper bound: alpha = rank
    makes the scale 1 whatever the rank turns out to be, and the factors are
    read with the shapes of the finished file. Lets a target use another
    target's LoRA output as an ingredient at plan time. ``format`` "diffusers":
    the PEFT modules :func:`write_lora` writes (no alpha: scale 1).
    """
    if format == "diffusers":
        return _planned_diffusers_adapter(path, modules, arch)
    parsed = [_planned_module(name, "kohya", SUFFIXES, weight_shape, rank, alpha=float(rank))
              for name, weight_shape, rank in sorted(modules)]
    module_tuple = tuple(parsed)
    return AdapterFile(path=str(path), modules=module_tuple, unclaimed=(), metadata={}, kind=describe_kind(module_tuple))


def _planned_diffusers_adapter(path, modules, arch: Architecture) -> AdapterFile:
    parsed = [
        # no alpha written: PEFT's default, alpha = rank
        _planned_module(part.name, "diffusers", PEFT_SUFFIXES, _part_shape(weight_shape, part), rank, alpha=None)
        for kohya_name, weight_shape, rank in modules
        for part in diffusers_parts(arch, kohya_name)
    ]
    module_tuple = tuple(sorted(parsed, key=lambda m: m.name))
    return AdapterFile(path=str(path), modules=module_tuple, unclaimed=(), metadata={}, kind=describe_kind(module_tuple))


def _planned_module(name: str, naming: str, suffixes: dict[str, str], weight_shape, rank: int, alpha: float | None) -> AdapterModule:
    """One LoRA module as the writer will write it (``suffixes``: role -> key suffix; scale 1, alpha = rank)."""
    shapes = factor_shapes(weight_shape, rank)
    return AdapterModule(
        name=name,
        naming=naming,
        kind="lora",
        tucker=False,
        dora=False,
        keys={role: f"{name}.{suffix}" for role, suffix in sorted(suffixes.items())},
        rank=rank,
        alpha=alpha,
        scale=1.0,
        delta_shape=tuple(weight_shape),
        shapes={role: shapes[role] for role in sorted(suffixes)},
    )


def estimated_lora_bytes(
    modules: Sequence[tuple[str, tuple[int, ...], int]], dtype: str, *, format: str = "kohya", arch: Architecture | None = None
) -> int:
    """Data bytes of the LoRA planned_lora_adapter describes (header excluded)."""
    size = dtypes.itemsize(dtype)
    total = 0
    if format == "diffusers":
        for name, weight_shape, rank in modules:
            for part in diffusers_parts(arch, name):
                shapes = factor_shapes(_part_shape(weight_shape, part), rank)
                total += (math.prod(shapes["up"]) + math.prod(shapes["down"])) * size
        return total
    for _, weight_shape, rank in modules:
        total += sum(math.prod(shape) for shape in factor_shapes(weight_shape, rank).values()) * size
    return total
