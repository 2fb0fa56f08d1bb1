"""Two versions of one output, tensor by tensor: what differs, and in which modules.

Used by ``verify`` once a rebuilt output's sha256 differs from the locked one
(or the file on disk does). The header's metadata is compared on its own;
tensors are compared by their raw bytes, then grouped into the modules a user
knows: for a LoRA the key's module prefix (``lora_unet_….lora_up.weight`` →
``lora_unet_…``), for a checkpoint the architecture table's modules that live
in the tensor (only the row slices that differ, for fused qkv weights), and
the tensor key itself for tensors no module owns (norms, biases, the VAE).
Each differing module gets its relative Frobenius error
(:mod:`loraforge.ops.compare`) measured against the reference (the locked
file), so the cross-device rule can judge it against a tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.formats.arch.table import Architecture
from loraforge.formats.safetensors_reader import SafetensorsFile, open_safetensors
from loraforge.ops.compare import dense_relative_error, factored_relative_error

UP, DOWN, ALPHA = "lora_up.weight", "lora_down.weight", "alpha"


@dataclass(frozen=True)
class ModuleDifference:
    """One module (or lone tensor) whose bytes differ between the two files."""

    module: str
    tensors: tuple[str, ...]
    relative_error: float  # ‖rebuilt − reference‖ / ‖reference‖ (inf when it cannot be measured)

    def to_json(self, tolerance: float | None = None) -> dict:
        entry = {"module": self.module, "tensors": list(self.tensors), "relative_error": _json_float(self.relative_error)}
        if tolerance is not None:
            entry["within_tolerance"] = self.relative_error <= tolerance
        return entry


@dataclass(frozen=True)
class FileDifference:
    """Everything that differs between a rebuilt file and the reference (locked) one."""

    metadata: tuple[str, ...] = ()  # header metadata keys that differ or exist in one file only
    missing: tuple[str, ...] = ()  # tensors only in the reference
    extra: tuple[str, ...] = ()  # tensors only in the rebuilt file
    layout: tuple[str, ...] = ()  # tensors whose dtype or shape differs
    data: tuple[str, ...] = ()  # tensors whose bytes differ (same dtype and shape)
    modules: tuple[ModuleDifference, ...] = field(default=())

    @property
    def tensors_differ(self) -> bool:
        return bool(self.missing or self.extra or self.layout or self.data)

    def out_of_tolerance(self, tolerance: float) -> tuple[ModuleDifference, ...]:
        return tuple(m for m in self.modules if not m.relative_error <= tolerance)

    def to_json(self, tolerance: float | None = None) -> dict:
        return {
            "metadata": list(self.metadata),
            "missing_tensors": list(self.missing),
            "extra_tensors": list(self.extra),
            "layout": list(self.layout),
            "data": list(self.data),
            "modules": [m.to_json(tolerance) for m in self.modules],
        }


def compare_files(rebuilt: Path, reference: Path, *, lora: bool, architecture: Architecture | None = None) -> FileDifference:
    """Compare ``rebuilt`` with ``reference``; ``lora`` says how keys group into modules."""
    with open_safetensors(rebuilt) as new, open_safetensors(reference) as old:
        metadata = _metadata_difference(new.metadata, old.metadata)
        new_names, old_names = set(new.names()), set(old.names())
        shared = sorted(new_names & old_names)
        layout = tuple(n for n in shared if (new.info(n).dtype, new.info(n).shape) != (old.info(n).dtype, old.info(n).shape))
        data = tuple(n for n in shared if n not in layout and not _same_bytes(new, old, n))
        difference = FileDifference(
            metadata=metadata,
            missing=tuple(sorted(old_names - new_names)),
            extra=tuple(sorted(new_names - old_names)),
            layout=layout,
            data=data,
        )
        if lora:
            modules = _lora_modules(new, old, difference)
        else:
            modules = _checkpoint_modules(new, old, difference, architecture)
    return FileDifference(**{**difference.__dict__, "modules": modules})


# --- header ---------------------------------------------------------------------


def _metadata_difference(new: dict[str, str], old: dict[str, str]) -> tuple[str, ...]:
    return tuple(sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k)))


def _same_bytes(new: SafetensorsFile, old: SafetensorsFile, name: str) -> bool:
    # Chunked, so a large checkpoint tensor never sits in memory twice over.
    return all(a == b for a, b in zip(new.iter_bytes(name), old.iter_bytes(name)))


# --- LoRA files -----------------------------------------------------------------


def _lora_modules(new: SafetensorsFile, old: SafetensorsFile, difference: FileDifference) -> tuple[ModuleDifference, ...]:
    changed = difference.missing + difference.extra + difference.layout + difference.data
    by_module: dict[str, set[str]] = {}
    for name in changed:
        by_module.setdefault(lora_module_name(name), set()).add(name)
    return tuple(
        ModuleDifference(module, tuple(sorted(tensors)), _lora_error(new, old, module))
        for module, tensors in sorted(by_module.items())
    )


def lora_module_name(key: str) -> str:
    """``lora_unet_x.lora_up.weight`` → ``lora_unet_x`` (kohya module names hold no dots)."""
    return key.split(".", 1)[0]


def _lora_error(new: SafetensorsFile, old: SafetensorsFile, module: str) -> float:
    ours, theirs = _factors(new, module), _factors(old, module)
    if theirs is None:
        return 0.0 if ours is None else math.inf
    if ours is None:
        return 1.0  # the module is missing: all of its ΔW is lost
    try:
        return _finite_or_inf(factored_relative_error(*ours, *theirs))
    except ValueError:  # the two modules adapt layers of different shapes
        return math.inf


def _factors(handle: SafetensorsFile, module: str):
    up, down, alpha = (f"{module}.{suffix}" for suffix in (UP, DOWN, ALPHA))
    if up not in handle or down not in handle:
        return None
    up_t, down_t = handle.read(up), handle.read(down)
    rank = int(down_t.shape[0]) if down_t.dim() else 0
    scale = float(handle.read(alpha).to(torch.float64)) / rank if alpha in handle and rank else 1.0
    return up_t, down_t, scale


# --- checkpoints ----------------------------------------------------------------


def _checkpoint_modules(
    new: SafetensorsFile, old: SafetensorsFile, difference: FileDifference, architecture: Architecture | None
) -> tuple[ModuleDifference, ...]:
    specs_by_key: dict[str, list] = {}
    for spec in architecture.modules if architecture else ():
        specs_by_key.setdefault(spec.key, []).append(spec)
    found: list[ModuleDifference] = []
    for name in difference.missing + difference.extra + difference.layout:
        found.append(ModuleDifference(_owner(name, specs_by_key), (name,), math.inf))
    for name in difference.data:
        found.extend(_differing_parts(new.read(name), old.read(name), name, specs_by_key.get(name, [])))
    return tuple(sorted(found, key=lambda m: (m.module, m.tensors)))


def _owner(key: str, specs_by_key: dict[str, list]) -> str:
    specs = specs_by_key.get(key)
    return " + ".join(s.kohya for s in specs) if specs else key


def _differing_parts(new: torch.Tensor, old: torch.Tensor, key: str, specs: list) -> list[ModuleDifference]:
    """The modules of one checkpoint tensor whose rows differ (the tensor itself when no module owns it)."""
    if not specs:
        return [ModuleDifference(key, (key,), _finite_or_inf(dense_relative_error(new, old)))]
    parts = []
    for spec in specs:
        rows = slice(*spec.rows) if spec.rows else slice(None)
        a, b = new[rows], old[rows]
        if not _bitwise_equal(a, b):
            parts.append(ModuleDifference(spec.kohya, (key,), _finite_or_inf(dense_relative_error(a, b))))
    return parts


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.contiguous().reshape(-1).view(torch.uint8).equal(b.contiguous().reshape(-1).view(torch.uint8))


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _json_float(value: float):
    return value if math.isfinite(value) else "inf"
