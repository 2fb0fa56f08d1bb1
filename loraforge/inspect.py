"""`loraforge inspect`: what a .safetensors file is, as plain data.

The report is a JSON-ready dict; the CLI renders it as tables or prints it as
JSON. Nothing here loads more than the header and (for adapters) the 0-d
alpha tensors.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from loraforge.errors import FormatError
from loraforge.formats.adapters import AdapterFile, flux_names, parse_adapter
from loraforge.formats.adapters.matching import detect_adapter_architecture, match_adapter
from loraforge.formats.arch import detect_architecture, loaders
from loraforge.formats.hashing import autov2, data_sha256, file_sha256
from loraforge.formats.safetensors_reader import SafetensorsFile, open_safetensors
from loraforge.plan.layout import SCALE_INPUT_SUFFIX, SCALED_FP8_MARKER, scaled_weights


def inspect_file(path: Path) -> dict:
    with open_safetensors(path) as file:
        report = {
            "file": str(path),
            "size": file.file_size,
            "tensors": len(file),
            "dtypes": dict(sorted(Counter(file.info(n).dtype for n in file.names()).items())),
            "metadata": dict(sorted(file.metadata.items())),
        }
        report.update(_describe(file))
    sha = file_sha256(path)
    data = data_sha256(path)
    report["hashes"] = {
        "sha256": sha,
        "autov2": autov2(sha),
        "data_sha256": data,
        "a1111_lora_hash": data[:12],
    }
    return report


def _describe(file: SafetensorsFile) -> dict:
    shapes = {name: tuple(file.info(name).shape) for name in file.names()}
    try:
        return _describe_checkpoint(file, detect_architecture(shapes))
    except FormatError as checkpoint_error:
        adapter = parse_adapter(file)
        if not adapter.modules:
            return {"kind": "unknown", "note": f"neither a checkpoint nor an adapter: {checkpoint_error}"}
        return _describe_adapter(adapter)


def _describe_checkpoint(file: SafetensorsFile, detection) -> dict:
    arch = detection.architecture
    components: dict[str, dict[str, int]] = {}
    for name in file.names():
        spec = arch.tensor_by_key.get(name)
        component = spec.component if spec else "extra"
        entry = components.setdefault(component, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += file.info(name).nbytes
    return {
        "kind": "checkpoint",
        "architecture": arch.name,
        "architecture_title": arch.title,
        "variant": arch.variant or None,
        "size_class": arch.size,
        "size_text": arch.size_text,
        "dimensions": dict(arch.dimensions),
        "inpaint": detection.inpaint,
        "v_prediction": detection.v_prediction,
        "components": dict(sorted(components.items())),
        "missing_keys": list(detection.missing),
        "extra_keys": list(detection.extra),
        "float8": _float8(file),
    }


def _float8(file: SafetensorsFile) -> dict | None:
    """How the file stores float8 weights: None (it does not), plain, or scaled (ComfyUI's scaled fp8:
    ``<module>.scale_weight`` per weight, maybe ``scale_input`` and the ``scaled_fp8`` marker; docs/baking.md)."""
    names = list(file.names())
    fp8 = sum(1 for n in names if file.info(n).dtype in ("F8_E4M3", "F8_E5M2") and file.info(n).nbytes)
    scaled = scaled_weights(file)
    if not fp8 and not scaled:
        return None
    return {
        "kind": "scaled" if scaled else "plain",
        "float8_tensors": fp8,
        "scaled_weights": len(scaled),
        "scale_input": sum(1 for n in names if n.endswith(SCALE_INPUT_SUFFIX)),
        "marker": next((n for n in names if n == SCALED_FP8_MARKER or n.endswith("." + SCALED_FP8_MARKER)), None),
    }


def _describe_adapter(adapter: AdapterFile) -> dict:
    try:
        arch = detect_adapter_architecture(adapter)
    except FormatError as error:
        return {"kind": "adapter", "adapter_kind": adapter.kind, "modules": len(adapter.modules), "note": str(error)}
    match = match_adapter(adapter, arch)
    per_block = Counter(spec.block for _, spec in match.matched)
    return {
        "kind": "adapter",
        "adapter_kind": adapter.kind,
        "architecture": arch.name,
        "architecture_title": arch.title,
        "dialect": _dialect(adapter, arch),
        "size_class": arch.size,
        "size_text": arch.size_text,
        "dimensions": dict(arch.dimensions),
        "modules": len(adapter.modules),
        "conv_modules": sum(1 for m in adapter.modules if m.is_conv),
        "text_encoder_modules": sum(1 for _, s in match.matched if s.is_text_encoder),
        "modules_per_block": {b: per_block[b] for b in arch.full_block_form if per_block[b]},
        "module_kinds": dict(sorted(Counter(_variant(m) for m in adapter.modules).items())),
        "ranks": _histogram(m.rank for m in adapter.modules),
        "alphas": _histogram(m.alpha for m in adapter.modules),
        "unmatched_modules": sorted(m.name for m in match.unmatched),
        "shape_mismatches": sorted(m.name for m, _ in match.shape_mismatches),
        "unclaimed_keys": list(adapter.unclaimed),
        "loader_skips": _loader_skips(arch.name, match.matched),  # {loader: [modules]}; null where not known
        # ComfyUI's load_lora reads alpha only from <module>.alpha tensors: a PEFT alpha kept in
        # lora_adapter_metadata (scale != 1) is applied there at alpha = rank (docs/adapters.md).
        "alpha_ignored_by_comfyui": sorted(
            m.name for m in adapter.modules if m.kind == "lora" and "alpha" not in m.keys and m.scale != 1.0
        ),
    }


def _loader_skips(family: str, matched) -> dict[str, list[str]] | None:
    """The file's modules (as the file names them) that common loaders are known to skip (formats/arch/loaders.py)."""
    return loaders.loader_skips(family, (
        (module.name, loaders.skipped_by(
            family, spec, module.name, naming=module.naming,
            kohya_factors=module.kind == "lora" and str(module.keys.get("down", "")).endswith(".lora_down.weight"),
        ))
        for module, spec in matched
    ))


def _dialect(adapter: AdapterFile, arch) -> str | None:
    """Which tool's naming the adapter uses, where a family has several (Flux: kohya, diffusers, ...)."""
    if arch.name != flux_names.FAMILY:
        return None
    return flux_names.dialect([m.name for m in adapter.modules]) or None


def _variant(module) -> str:
    return module.kind + ("+tucker" if module.tucker else "") + ("+dora" if module.dora else "")


def _histogram(values) -> dict[str, int]:
    counts = Counter("none" if v is None else _number(v) for v in values)
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == "none", _sort_number(kv[0]))))


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _sort_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")
