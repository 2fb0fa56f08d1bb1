"""`kind: convert`: a checkpoint's or LoRA's floating-point tensors rewritten in another dtype.

Each float tensor (F16, BF16, F32, F64) becomes the target dtype with one
correct rounding (round to nearest, ties to even; the bake's rounding, so the
numeric policy is the bake's); integer, boolean and float8 tensors are copied
byte for byte, as are tensors already in that dtype. Names, order and the
source's metadata are kept; the ``loraforge.*`` provenance keys are written
anew, data hashes (``modelspec.hash_sha256``, ``sshs_model_hash``) are
recomputed and kohya's ``sshs_legacy_hash``, a hash of file bytes that can no
longer be right, is dropped. A value the dtype cannot hold stops the build.

A ComfyUI scaled-fp8 checkpoint (``scale_weight`` tensors) is dequantised as
a bake into a float dtype dequantises it (docs/baking.md): each scaled weight
becomes RN(stored x scale), and the scales and the ``scaled_fp8`` marker are
left out.

The output is what the source is: a converted LoRA can be a later target's
`loras:` entry, a converted checkpoint its `base:`.

This module is the whole kind (the planned target, planning, the run, the
report): the worked example of docs/design.md's "add a target kind".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from loraforge import __version__
from loraforge.errors import BuildError, FormatError
from loraforge.execute.prefetch import prefetched
from loraforge.formats.adapters import AdapterFile, parse_adapter
from loraforge.formats.arch import Detection, detect_architecture
from loraforge.formats.dtypes import itemsize, precision_code, torch_dtype
from loraforge.formats.hashing import modelspec_hash
from loraforge.formats.lora_output import SSHS_KEY, SSHS_PLACEHOLDER
from loraforge.formats.metadata import HASH_KEY, HASH_PLACEHOLDER
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import SafetensorsWriter, TensorPlan, WriteResult
from loraforge.ops.finite import overflow_count
from loraforge.ops.fp8 import dequantised, scale_value
from loraforge.ops.rounding import round_float64
from loraforge.plan.action_key import BAKE_NUMERIC_POLICY, action_key
from loraforge.plan.bake import SCALED_FP8_POLICY
from loraforge.plan.ingredients import input_file
from loraforge.plan.kinds import TargetKind
from loraforge.plan.layout import OutputTensor, output_layout, scaled_weights
from loraforge.plan.provenance import provenance_fields
from loraforge.plan.report import common_fields
from loraforge.plan.target import PlannedTarget
from loraforge.recipe.schema import ConvertTarget
from loraforge.text import human_bytes

CONVERT_MEMORY_FLOOR = 256 << 20  # torch, the reader thread, buffers
PREFETCH_DEPTH = 2
# Data hashes a converted file can have recomputed: key -> (placeholder, value from the data sha256).
DEFERRED_HASHES = {HASH_KEY: (HASH_PLACEHOLDER, modelspec_hash), SSHS_KEY: (SSHS_PLACEHOLDER, lambda sha: sha)}
DROPPED_KEYS = ("sshs_legacy_hash",)  # a hash of file bytes at fixed offsets: wrong after any rewrite


@dataclass(frozen=True, kw_only=True)
class ConversionTarget(PlannedTarget):
    kind: ClassVar[str] = "convert"

    source: str  # the input or target converted
    source_path: Path  # the file read (a producer's output path while it is unbuilt)
    dtype: str  # the output's float dtype code: "F16", "BF16" or "F32"
    source_produces: str  # "checkpoint" or "lora": what the source is, and so the output
    adapter: AdapterFile | None  # a LoRA source's modules (what readers of the output will see)
    structure_path: Path | None  # a checkpoint source: a file with its names and shapes, readable now
    detection: Detection | None  # a checkpoint source's family, when one fits

    @property
    def produces(self) -> str:
        return self.source_produces

    def lora_adapter(self) -> AdapterFile:
        if self.adapter is None:
            return super().lora_adapter()
        return replace(self.adapter, path=str(self.output))

    @property
    def lora_dtype(self) -> str:
        return self.dtype

    def checkpoint_structure(self) -> tuple[Path, Detection | None, str]:
        if self.structure_path is None:
            return super().checkpoint_structure()
        return self.structure_path, self.detection, self.dtype  # a conversion keeps every name and shape


@dataclass(frozen=True)
class ConvertResult:
    target: str
    written: WriteResult
    converted: int  # tensors rounded to the new dtype
    copied: int  # tensors copied byte for byte


class ConvertKind(TargetKind):
    name = "convert"
    spec = ConvertTarget
    summary = "rewrite a checkpoint or LoRA in another float dtype, each value correctly rounded"
    operation = "bake"  # the same rounding as a bake's: RN of the exact value, ties to even
    numeric_policy = BAKE_NUMERIC_POLICY

    def plan(self, context, name: str) -> ConversionTarget:
        loaded = context.loaded
        spec = loaded.recipe.targets[name]
        dtype = precision_code(spec.dtype)
        fields = _unbuilt_source(context, name) if _is_unbuilt_target(context, spec.source) else _file_source(context, name, dtype)
        # A ComfyUI scaled-fp8 checkpoint is dequantised (docs/baking.md): its key says so, other keys are unchanged.
        policy = BAKE_NUMERIC_POLICY + (f" + {SCALED_FP8_POLICY}" if _scaled_source(fields["source_path"]) else "")
        return ConversionTarget(
            name=name,
            output=context.output_path(name),
            device="cpu",  # no tensor math beyond rounding: the device never matters
            dependencies=tuple(d for d in spec.dependencies() if d in loaded.recipe.targets),
            action_key=action_key(loaded, name, "convert", context.input_hashes(name), policy),
            source=spec.source,
            dtype=dtype,
            **fields,
        )

    def run(self, target: ConversionTarget, run) -> ConvertResult:
        with open_safetensors(target.source_path) as source:
            scaled = scaled_weights(source)  # ComfyUI scaled fp8: weights dequantised, scales left out
            layout = output_layout(source, target.dtype, scaled=scaled)
            metadata, deferred = _output_metadata(source.metadata, provenance_fields(run.plan, target))
            target.output.parent.mkdir(parents=True, exist_ok=True)
            plan = [TensorPlan(t.name, t.dtype, t.shape) for t in layout]
            with SafetensorsWriter(target.output, plan, metadata, deferred_keys=tuple(deferred)) as writer:
                load = lambda entry: source.read_bytes(entry.name) if entry.action == "copy" else source.read(entry.name)  # noqa: E731
                for entry, data in prefetched(layout, load, PREFETCH_DEPTH):
                    if entry.action == "convert":
                        data = _converted(target, entry, data)
                    elif entry.action == "dequantise":  # stored fp8 x scale, exact in float64, rounded once
                        data = _converted(target, entry, dequantised(data, scale_value(source.read(scaled[entry.name]))))
                    writer.write(entry.name, data)
                    run.progress(entry.nbytes)
                written = writer.commit(deferred_metadata=deferred or None)
        converted = sum(1 for t in layout if t.action in ("convert", "dequantise"))
        return ConvertResult(target.name, written, converted, len(layout) - converted)

    def report(self, target: ConversionTarget) -> dict:
        architecture = target.architecture.name if target.architecture is not None else None
        return {
            **common_fields(target, architecture=architecture, save_dtype=target.dtype),
            "source": target.source,
            "produces": target.produces,
        }

    def heading(self, report) -> str:
        return f"convert {report['produces']} to {report['save_dtype']}"

    def describe(self, report) -> list:
        after = f"  (after {', '.join(report['depends_on'])})" if report["depends_on"] else ""
        return [
            f"source: {report['source']}{after}",
            f"output: {report['output']}",
            f"reads {human_bytes(report['read_bytes'])}, writes {human_bytes(report['write_bytes'])}",
        ]

    def built_lines(self, result: ConvertResult) -> list[str]:
        written = result.written
        return [
            f"{human_bytes(written.size)}; {result.converted} tensors converted, {result.copied} copied",
            f"sha256 {written.sha256}",
        ]


# --- planning -----------------------------------------------------------------------


def _is_unbuilt_target(context, source: str) -> bool:
    return source in context.loaded.recipe.targets and source not in context.built


def _unbuilt_source(context, name: str) -> dict:
    """A producer not built yet: the output is described from its plan (planned again once it is built)."""
    loaded = context.loaded
    producer = context.planned[loaded.recipe.targets[name].source]
    if producer.produces == "bundle":
        raise loaded.error(
            ("targets", name, "source"),
            f"target '{producer.name}' is a release folder, not a safetensors file.",
            "Convert one of the targets it bundles instead.",
        )
    lora = producer.produces == "lora"
    structure_path, detection, _ = (None, None, None) if lora else producer.checkpoint_structure()
    return dict(
        source_path=producer.output, source_produces=producer.produces,
        adapter=producer.lora_adapter() if lora else None, architecture=producer.architecture,
        structure_path=structure_path, detection=detection,
        read_bytes=producer.write_bytes, write_bytes=producer.write_bytes,
        memory_bytes=CONVERT_MEMORY_FLOOR + producer.memory_bytes // 4,
    )


def _file_source(context, name: str, dtype: str) -> dict:
    """An input, or a target's output that exists: read its header now."""
    loaded = context.loaded
    source = loaded.recipe.targets[name].source
    if source in context.built:
        path = context.built[source].path
    else:
        path = input_file(loaded, context.inputs[source], context.input_sha256[source])
    try:
        with open_safetensors(path) as file:
            adapter = parse_adapter(file)
            shapes = {key: tuple(file.info(key).shape) for key in file.names()}
            layout = output_layout(file, dtype, scaled=scaled_weights(file))
            size = file.file_size
    except FormatError as error:
        raise loaded.error(("targets", name, "source"), f"'{source}' ({path}) cannot be converted: {error}") from None
    lora = bool(adapter.modules)
    detection = None if lora else _detection(shapes)
    largest = max((math.prod(t.shape) for t in layout), default=0)
    return dict(
        source_path=Path(path), source_produces="lora" if lora else "checkpoint",
        adapter=adapter if lora else None, architecture=detection.architecture if detection else None,
        structure_path=None if lora else Path(path), detection=detection,
        read_bytes=size, write_bytes=sum(t.nbytes for t in layout),
        memory_bytes=CONVERT_MEMORY_FLOOR + (PREFETCH_DEPTH + 2) * largest * itemsize("F64"),
    )


def _scaled_source(path: Path | None) -> bool:
    """Whether the source file (when it exists yet) is a ComfyUI scaled-fp8 checkpoint."""
    if path is None or not Path(path).is_file():
        return False
    try:
        with open_safetensors(path) as file:
            return bool(scaled_weights(file))
    except (OSError, FormatError):
        return False


def _detection(shapes: dict) -> Detection | None:
    """The checkpoint's family, when it is one loraforge knows (any safetensors file converts)."""
    try:
        return detect_architecture(shapes)
    except FormatError:
        return None


# --- running ------------------------------------------------------------------------


def _output_metadata(source: dict, provenance: dict) -> tuple[dict, dict]:
    """The source's metadata with this build's provenance, and the data hashes to fill in at commit."""
    metadata = {key: value for key, value in source.items() if key not in DROPPED_KEYS and not key.startswith("loraforge.")}
    deferred = {}
    for key, (placeholder, fill) in DEFERRED_HASHES.items():
        if key in metadata:
            metadata[key] = placeholder
            deferred[key] = fill
    metadata["loraforge.version"] = __version__
    metadata.update({f"loraforge.{key}": value for key, value in provenance.items()})
    return dict(sorted(metadata.items())), deferred


def _converted(target: ConversionTarget, entry: OutputTensor, data: torch.Tensor) -> torch.Tensor:
    """One correct rounding (a float64 source is rounded once, not through float32); overflow refused."""
    rounded = round_float64(data, torch_dtype(entry.dtype))
    count = overflow_count(rounded, data)
    if count:
        raise BuildError(
            f"target '{target.name}': tensor {entry.name} of '{target.source}' holds {count:,} values of "
            f"{math.prod(entry.shape):,} beyond the largest {entry.dtype} number ({torch.finfo(rounded.dtype).max:.6g}); "
            "they would be written as infinities. Nothing was written. Convert to a wider dtype (bfloat16 or float32)."
        )
    return rounded
