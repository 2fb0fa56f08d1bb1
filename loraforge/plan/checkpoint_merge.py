"""Planning the `merge:` of a `kind: checkpoint` target (docs/merging-checkpoints.md).

From headers only: locate every model (an input or a checkpoint-producing
target), check that they are one family at one size and hold every tensor
the primary model has with the same shape, decide per tensor whether it is
merged or taken from one model (the `components:` rule), and evaluate each
parameter at each block. The result is frozen data the executor
(execute/checkpoint_merge.py) streams from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from loraforge.canonical import canonical_json
from loraforge.errors import FormatError
from loraforge.formats.arch import Detection, detect_architecture
from loraforge.formats.arch.block_weights import PRESETS, UNIFORM_PRESETS, BlockWeightError, parse_block_weights
from loraforge.formats.arch.table import TEXT_ENCODERS, Architecture
from loraforge.formats.arch.unet import ldm_block_id
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.methods.checkpoint import CheckpointMergeMethod, checkpoint_method
from loraforge.plan.action_key import action_key
from loraforge.plan.device_class import device_class
from loraforge.plan.ingredients import input_file

MERGED_DTYPES = ("F16", "BF16", "F32", "F64")
CHECKPOINT_MERGE_NUMERIC_POLICY = (
    "checkpoint-merge-v1: linear methods RN(exact sum of coefficient x model element [/ exact sum of weights]) in "
    "the first model's dtype, certified as bakes; non-linear methods IEEE float64 in a fixed order (models in "
    "recipe order, elementwise; reductions numpy pairwise), one rounding; masks numpy PCG64 seeded by "
    "sha256(recipe seed, tensor, model position); equal inputs copied when the method returns them; "
    "LoRAs then baked on the merged tensor"
)


@dataclass(frozen=True)
class MergeModel:
    name: str
    path: Path  # the file read at build time (a target's output for chains)
    structure_path: Path  # a file with its layout, readable now
    detection: Detection
    size: int


@dataclass(frozen=True)
class CheckpointMergePlan:
    method: str
    models: tuple[MergeModel, ...]  # `models:` in order, then the base when there is one
    has_base: bool
    primary: int  # index of the model whose layout and dtypes the output keeps (the base, else the first)
    seed: int  # the recipe's: DARE masks
    block_values: Mapping[str, Mapping[str, Any]]  # block -> parameter -> value at that block
    tensor_blocks: Mapping[str, str]  # merged tensor -> its block
    taken: Mapping[str, int]  # tensor -> model whose bytes it takes
    shown: Mapping[str, Any]  # parameter -> a number, or {block: value} (plan, provenance)
    device_class: str | None  # the device class non-linear methods' bytes depend on

    @property
    def method_class(self) -> CheckpointMergeMethod:
        return checkpoint_method(self.method)

    @property
    def primary_model(self) -> MergeModel:
        return self.models[self.primary]

    def values_at(self, tensor: str) -> Mapping[str, Any]:
        return self.block_values[self.tensor_blocks[tensor]]

    def read_bytes(self) -> int:
        return sum(model.size for model in self.models)

    def provenance_json(self) -> str:
        """`loraforge.merge` metadata: the method, its models and each parameter (per block where it varies)."""
        return canonical_json({
            "method": self.method,
            "formula": self.method_class.formula,
            "models": [m.name for m in self.models[: len(self.models) - self.has_base]],
            "base": self.models[-1].name if self.has_base else None,
            "parameters": dict(self.shown),
        }, ascii=False)


def plan_checkpoint_merge(context, name: str) -> CheckpointMergePlan:
    loaded = context.loaded
    spec = loaded.recipe.targets[name].merge
    method = spec.method_class
    where = ("targets", name, "merge")
    refs = [((*where, "models", i), model) for i, model in enumerate(spec.models)]
    if spec.base is not None:
        refs.append(((*where, "base"), spec.base))
    models = tuple(_locate(context, path, ref) for path, ref in refs)
    primary = len(models) - 1 if spec.base is not None else 0
    arch = _same_family(loaded, models, refs, primary)
    with open_safetensors(models[primary].structure_path) as first:
        infos = {key: first.info(key) for key in first.names()}
    shapes = []
    for model in models:
        with open_safetensors(model.structure_path) as handle:
            shapes.append({key: tuple(handle.info(key).shape) for key in handle.names()})
    te_rule = (spec.components.te if spec.components else None) or "merge"
    vae_rule = (spec.components.vae if spec.components else None) or "first"
    names = [m.name for m in models]
    tensor_blocks, taken = {}, {}
    for key, info in infos.items():
        component = arch.tensor_by_key[key].component if key in arch.tensor_by_key else "other"
        rule = te_rule if component in TEXT_ENCODERS else vae_rule if component == "vae" else "merge"
        if info.dtype not in MERGED_DTYPES or component == "other" or rule != "merge":
            source = primary if rule in ("first", "merge") else names.index(rule)
            _check_shape(loaded, refs, models[primary].name, shapes, source, key, tuple(info.shape))
            taken[key] = source
            continue
        for index in range(len(models)):
            _check_shape(loaded, refs, models[primary].name, shapes, index, key, tuple(info.shape))
        tensor_blocks[key] = tensor_block(key, component, arch)
    block_values, shown = _evaluate(loaded, where, method, spec.parameters, arch, set(tensor_blocks.values()))
    for block, values in block_values.items():
        problem = method.check(values)
        if problem is not None:
            raise loaded.error(where, f"method {method.name}, block {block}: {problem[0]}", problem[1])
    return CheckpointMergePlan(
        method=method.name, models=models, has_base=spec.base is not None, primary=primary,
        seed=loaded.recipe.seed, block_values=block_values,
        tensor_blocks=MappingProxyType(tensor_blocks), taken=MappingProxyType(taken), shown=shown,
        device_class=None if method.linear else device_class(context.device_of(name)),
    )


def merge_action_key(context, name: str, merge: CheckpointMergePlan, bake_policy: str) -> str | None:
    """The bake's key with the bake policy extended by the merge's (the lock's recorded policy stays the
    bake's, so existing locks are unchanged) and, for non-linear methods, the device class."""
    extra = {"device_class": merge.device_class} if merge.device_class is not None else None
    policy = f"{bake_policy} + {CHECKPOINT_MERGE_NUMERIC_POLICY}"
    return action_key(context.loaded, name, "bake", context.input_hashes(name), policy, extra)


CHUNK_WORK_BYTES = 64 << 20  # float64 work arrays of one chunk (2^18 elements) on one thread, rounded up
MERGE_THREADS = 2  # the bake's worker pool, which computes a merge's chunks


def merge_memory_bytes(plan: CheckpointMergePlan) -> int:
    """Peak memory of the merge (docs/merging-checkpoints.md, "Streaming and memory"): three tensors in flight
    (the bake's read-ahead) of every model; chunked methods add fixed work arrays per thread (TIES one float64
    magnitude array of the tensor per thread), whole-tensor methods float64 copies of every model's tensor."""
    with open_safetensors(plan.primary_model.structure_path) as handle:
        largest = max((math.prod(handle.info(key).shape) for key in plan.tensor_blocks), default=0)
    in_flight = 3  # the tensor being baked and two read ahead
    method = plan.method_class
    if method.linear or method.elementwise:
        trim = MERGE_THREADS * 8 * largest if method.name == "ties" else 0
        return in_flight * largest * 8 * len(plan.models) + MERGE_THREADS * CHUNK_WORK_BYTES + trim
    return in_flight * largest * 8 * (2 * len(plan.models) + 4)


# --- blocks ----------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."


def tensor_block(key: str, component: str, arch: Architecture) -> str:
    """The block-weight block of a checkpoint tensor: the UNet's by the table's rule (formats/arch/unet.py,
    the same as LoRA block weights use), everything else BASE (docs/merging-checkpoints.md)."""
    if component != "unet" or not key.startswith(UNET_PREFIX):
        return "BASE"
    last_output_block = max(int(block[3:]) for block in arch.full_block_form if block.startswith("OUT"))
    return ldm_block_id(key[len(UNET_PREFIX):], last_output_block)


def _evaluate(loaded, where, method, parameters, arch, blocks_used) -> tuple[dict, dict]:
    """Each parameter at each block used; what `plan` shows (a number, or per block)."""
    per_block: dict[str, dict[str, Any]] = {block: {} for block in arch.full_block_form if block in blocks_used}
    shown: dict[str, Any] = {}
    for parameter in method.declared:
        value = parameters.get(parameter.name)
        if parameter.kind == "flag":
            for values in per_block.values():
                values[parameter.name] = bool(value)
            shown[parameter.name] = bool(value)
            continue
        items = list(value) if parameter.per_model else [value]
        columns = []
        for index, item in enumerate(items):
            path = (*where, parameter.name, index) if parameter.per_model else (*where, parameter.name)
            columns.append(_at_blocks(loaded, path, parameter, item, arch, per_block))
        for block, values in per_block.items():
            values[parameter.name] = tuple(c[block] for c in columns) if parameter.per_model else columns[0][block]
        shown[parameter.name] = [_shown(c) for c in columns] if parameter.per_model else _shown(columns[0])
    frozen = {block: MappingProxyType(values) for block, values in per_block.items()}
    return MappingProxyType(frozen), shown


def _at_blocks(loaded, path, parameter, value, arch, per_block) -> dict[str, float]:
    if isinstance(value, (int, float)):
        return dict.fromkeys(per_block, float(value))
    if isinstance(value, str) and value.upper() in {p.upper() for p in UNIFORM_PRESETS}:
        preset = next(p for p in UNIFORM_PRESETS if p.upper() == value.upper())
        numbers = dict.fromkeys(per_block, PRESETS[preset][0])
    else:
        try:
            weights = parse_block_weights(dict(value) if isinstance(value, Mapping) else value, arch)
        except BlockWeightError as error:
            raise loaded.error(path, str(error)) from None
        missing = [block for block in per_block if not weights.covers(block)]
        if missing:
            raise loaded.error(
                path,
                f"the block weights of {parameter.name} ({weights.description}) name no value for block "
                f"{', '.join(missing)}, which the merge touches (a merge changes every block).",
                f"give the {len(arch.full_block_form)}-value form ({', '.join(arch.full_block_form)}) or a mapping "
                "with a default, e.g. {default: 0.5, OUT03-OUT06: 1}",
            )
        numbers = {block: weights.weight(block) for block in per_block}
    bad = {block: number for block, number in numbers.items() if not parameter.in_range(number)}
    if bad:
        block, number = next(iter(bad.items()))
        raise loaded.error(path, f"{parameter.name} must lie in {parameter.range_text()}, but is {number!r} at block {block}",
                           parameter.hint)
    return numbers


def _shown(numbers: Mapping[str, float]) -> Any:
    distinct = set(numbers.values())
    return next(iter(distinct)) if len(distinct) == 1 else dict(numbers)


# --- models ----------------------------------------------------------------------------


def _locate(context, path: tuple, ref: str) -> MergeModel:
    """Where model ``ref`` comes from and what it is (as a bake's base)."""
    loaded = context.loaded
    if ref in context.built:
        return _read(loaded, path, ref, context.built[ref].path, context.built[ref].path)
    if ref in context.planned:
        producer = context.planned[ref]
        if producer.produces != "checkpoint":
            raise loaded.error(path, f"target '{ref}' produces a {producer.produces}, not a checkpoint, so it cannot be merged.",
                               "name checkpoint inputs or `kind: checkpoint` targets under merge:")
        if hasattr(producer, "checkpoint_structure"):
            structure, detection, _ = producer.checkpoint_structure()
        else:
            structure, detection = producer.structure_path, producer.detection
        if detection is None:
            return _read(loaded, path, ref, producer.output, structure)
        return MergeModel(ref, producer.output, structure, detection, producer.write_bytes)
    if ref in loaded.recipe.targets:
        raise loaded.error(path, f"target '{ref}' cannot be merged here.")
    file = input_file(loaded, context.inputs[ref], context.input_sha256[ref])
    return _read(loaded, path, ref, file, file)


def _read(loaded, path: tuple, ref: str, file: Path, structure: Path) -> MergeModel:
    try:
        with open_safetensors(structure) as handle:
            shapes = {n: handle.info(n).shape for n in handle.names()}
        detection = detect_architecture(shapes)
    except FormatError as error:
        raise loaded.error(path, f"model '{ref}' is not a usable checkpoint: {error}") from None
    return MergeModel(ref, file, structure, detection, structure.stat().st_size)


def _same_family(loaded, models, refs, primary) -> Architecture:
    first = models[primary].detection
    for (path, ref), model in zip(refs, models):
        detection = model.detection
        if (detection.architecture.name, detection.architecture.dimensions, detection.inpaint) != (
            first.architecture.name, first.architecture.dimensions, first.inpaint
        ):
            def text(d):
                return f"{d.architecture.title}{' inpainting' if d.inpaint else ''} ({d.architecture.size_text})"
            raise loaded.error(
                path,
                f"model '{ref}' is {text(detection)} but '{models[primary].name}' is {text(first)}: "
                "checkpoints of different families or sizes cannot be merged tensor by tensor.",
                "merge models of one family at one size (`loraforge inspect` shows each file's)",
            )
    return first.architecture


def _check_shape(loaded, refs, primary_name, shapes, index, key, shape) -> None:
    found = shapes[index].get(key)
    if found == shape:
        return
    path, ref = refs[index]
    what = f"has no tensor {key}" if found is None else f"holds {key} with shape {list(found)}"
    raise loaded.error(
        path,
        f"model '{ref}' {what}, but the primary model '{primary_name}' holds it with shape {list(shape)}, "
        "which the merged output keeps.",
        "merge checkpoints with the same tensors (the same family and size, saved with the same layout)",
    )
