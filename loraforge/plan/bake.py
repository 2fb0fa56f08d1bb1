"""Planning a `kind: checkpoint` target: base, ingredients, module matching.

For each LoRA entry (plan/ingredients.py, shared with merges): parse the
adapter's header, match every module onto the base architecture's table,
evaluate block weights, and record which modules land on which checkpoint key
with which coefficient. Anything that maps to nothing is an error unless the
target allows it. An entry may name a LoRA-producing target of the recipe.
"""

from __future__ import annotations

import math
from pathlib import Path

from loraforge.errors import FormatError
from loraforge.formats.arch import Detection, detect_architecture
from loraforge.formats.dtypes import precision_code
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.plan.action_key import BAKE_NUMERIC_POLICY, action_key
from loraforge.plan.checkpoint_merge import merge_action_key, merge_memory_bytes, plan_checkpoint_merge
from loraforge.plan.context import PlanContext
from loraforge.plan.target import PRODUCT_WORDS
from loraforge.plan.ingredients import adapter_source, input_file, plan_ingredient
from loraforge.plan.layout import check_baked_keys, check_narrow_bake, check_scaled_bake, output_layout, scaled_weights
from loraforge.plan.model import BakeTarget

BAKE_MEMORY_FLOOR = 256 << 20  # torch, the reader and writer threads, buffers


def plan_bake(context: PlanContext, name: str) -> BakeTarget:
    """Plan a `kind: checkpoint` target: its base, and every LoRA module's landing place."""
    loaded = context.loaded
    recipe = loaded.recipe
    spec = recipe.targets[name]
    merge = plan_checkpoint_merge(context, name) if spec.merge is not None else None
    if merge is None:
        base_path, structure_path, detection, base_bytes = _plan_base(context, name)
    else:  # the merge stands in for the base: its primary model's layout, every model's bytes read
        primary = merge.primary_model
        base_path, structure_path, detection, base_bytes = primary.path, primary.structure_path, primary.detection, merge.read_bytes()
    base_name = spec.base if merge is None else primary.name
    ingredients, applications, read_bytes = [], {}, base_bytes
    for index, lora in enumerate(spec.loras):
        source = adapter_source(context, ("targets", name, "loras", index), lora.use)
        ingredient, module_applications = plan_ingredient(
            loaded, name, index, source, detection.architecture,
            allow_unmatched=spec.allow_unmatched, base_label=f"base '{base_name}'" if merge is None else f"merge of '{base_name}'",
        )
        ingredients.append(ingredient)
        read_bytes += source.size
        for application in module_applications:
            key = application.spec.bias_key if application.part == "bias" else application.spec.key
            applications.setdefault(key, []).append(application)
    precision = recipe.effective_precision(name)
    save = "same" if precision.save == "same" else precision_code(precision.save)
    with open_safetensors(structure_path) as structure:
        check_baked_keys(loaded, name, structure, applications)  # a module aimed at a weight the file lacks
        check_narrow_bake(loaded, name, structure, save, applications)  # never a LoRA rounded away in float8
        check_scaled_bake(loaded, name, structure, save, applications)  # scaled fp8: requantisable, or dequantised
        scaled = bool(scaled_weights(structure))
        if scaled and merge is not None:
            _refuse_scaled_merge(loaded, name)
    ordered = {key: tuple(applications[key]) for key in sorted(applications)}
    largest = _largest_baked_tensor(structure_path, ordered)
    policy = _policy(ordered) + (f" + {SCALED_FP8_POLICY}" if scaled else "")
    return BakeTarget(
        name=name,
        base=base_name,
        base_path=base_path,
        structure_path=structure_path,
        output=context.output_path(name),
        detection=detection,
        architecture=detection.architecture,
        save=save,
        device=context.device_of(name),
        ingredients=tuple(ingredients),
        applications=ordered,
        dependencies=tuple(d for d in recipe.dependencies(name) if d in recipe.targets),
        action_key=(action_key(loaded, name, "bake", context.input_hashes(name), policy) if merge is None
                    else merge_action_key(context, name, merge, policy)),
        read_bytes=read_bytes,
        write_bytes=_estimated_output_bytes(structure_path, save),
        # a float64 workspace, the weight in and out, prefetched and pending tensors, the adapters' factors
        memory_bytes=BAKE_MEMORY_FLOOR + 8 * largest * 4 + sum(i.path.stat().st_size if i.path.exists() else 0 for i in ingredients)
        + (merge_memory_bytes(merge) if merge is not None else 0)
        + (SCALED_FP8_BYTES_PER_ELEMENT * largest if scaled else 0),
        merge=merge,
    )


# What a DoRA module at strength (x block weight) s != 1 adds: each tool's own definition (docs/adapters.md).
# Part of the key of the bakes that have such a module only, so every other bake keeps its key and bytes.
DORA_STRENGTH_POLICY = (
    "dora-strength-v1: W'(s) - W with the module's convention: lycoris (W+dW)(s(m/||W+dW|| + eps - 1) + 1) - W, "
    "peft m(W+s dW)/||W+s dW|| - W; fixed-order IEEE float64"
)


# A scaled-fp8 base (ComfyUI scale_weight tensors): part of the key of those bakes only, so every other bake
# keeps its key and bytes (docs/baking.md, "Scaled fp8 bases").
SCALED_FP8_POLICY = (
    "scaled-fp8-v1: W = fp8 x scale_weight (exact, float64); save float: RN(W + sum) in it, scales and marker left "
    "out; save same: scale kept unless the exact max |W + sum| > 448 scale, else the least float32 >= max / 448; "
    "RN_E4M3(exact / scale) with ties to even, never saturating"
)
# A scaled bake's extra buffers per element of the largest weight: the dequantised float64 weight and the float8
# result (the requantising loop's float64 temporaries are bounded by ops/bake.SCALED_CHUNK_ELEMENTS).
SCALED_FP8_BYTES_PER_ELEMENT = 8 + 1


def _refuse_scaled_merge(loaded, name: str) -> None:
    raise loaded.error(
        ("targets", name, "merge"),
        f"target '{name}' merges checkpoints stored as ComfyUI scaled fp8 (scale_weight tensors); a checkpoint merge "
        "reads the stored fp8 values without their scales, so loraforge refuses it.",
        "Merge bf16 releases of the models, or bake LoRAs into the scaled fp8 file with `base:` instead.",
    )


def _policy(applications) -> str:
    """The bake's numeric policy, extended for DoRA modules applied at a strength other than 1."""
    if any(a.dora is not None and a.coefficient != 1.0 for group in applications.values() for a in group):
        return f"{BAKE_NUMERIC_POLICY} + {DORA_STRENGTH_POLICY}"
    return BAKE_NUMERIC_POLICY


def _plan_base(context: PlanContext, name: str) -> tuple[Path, Path, Detection, int]:
    """Where the base comes from and what architecture it is."""
    loaded = context.loaded
    base = loaded.recipe.targets[name].base
    if base in context.built:
        return _read_base(loaded, name, base, context.built[base].path)
    if base in context.planned:
        producer = context.planned[base]
        if producer.produces != "checkpoint":
            raise loaded.error(
                ("targets", name, "base"),
                f"target '{base}' produces a {PRODUCT_WORDS[producer.produces]}, not a checkpoint, so it cannot be a base.",
                "Name a checkpoint input or a target that produces a checkpoint as the base, and list a LoRA under `loras:`.",
            )
        structure_path, detection, _ = producer.checkpoint_structure()
        if detection is None:  # a checkpoint loraforge cannot place: say why, as for a file
            _read_base(loaded, name, base, structure_path)
        return producer.output, structure_path, detection, producer.write_bytes
    if base in loaded.recipe.targets:
        raise loaded.error(("targets", name, "base"), f"target '{base}' cannot be used as a base here.")
    return _read_base(loaded, name, base, input_file(loaded, context.inputs[base], context.input_sha256[base]))


def _read_base(loaded, name: str, base: str, path: Path) -> tuple[Path, Path, Detection, int]:
    try:
        with open_safetensors(path) as base_file:
            shapes = {n: base_file.info(n).shape for n in base_file.names()}
        detection = detect_architecture(shapes)
    except FormatError as error:
        raise loaded.error(("targets", name, "base"), f"base '{base}' is not a usable checkpoint: {error}") from None
    return path, path, detection, path.stat().st_size


def _largest_baked_tensor(structure_path: Path, applications) -> int:
    """Elements of the largest weight the bake computes (its float64 copies dominate memory)."""
    with open_safetensors(structure_path) as base_file:
        return max((math.prod(base_file.info(key).shape) for key in applications if key in base_file), default=0)


def _estimated_output_bytes(structure_path: Path, save: str) -> int:
    with open_safetensors(structure_path) as base_file:
        layout = output_layout(base_file, save)
    return sum(entry.nbytes for entry in layout)


def scaled_fp8_report(target: BakeTarget) -> dict | None:
    """What a bake does to a ComfyUI scaled-fp8 base (None for any other base): how many scaled weights it
    changes and how they are saved (requantised with their scale, or dequantised with the scales left out)."""
    if target.merge is not None:
        return None
    try:
        with open_safetensors(target.structure_path) as structure:
            scaled = scaled_weights(structure)
    except (OSError, FormatError):
        return None
    if not scaled:
        return None
    return {
        "scaled_weights": len(scaled),
        "baked": sum(1 for key in target.applications if key in scaled),
        "saved_as": "F8_E4M3 + scale_weight" if target.save == "same" else f"{target.save}, scales left out",
    }


EMA_PREFIX = "model_ema."
EMA_SCALAR_KEYS = ("model_ema.decay", "model_ema.num_updates")
UNET_PREFIX = "model.diffusion_model."


def ema_tensors_left(target: BakeTarget) -> int:
    """How many EMA copies of weights (SD 1.x ``model_ema.*``, the decay and update count aside) the bake leaves
    as they are while it changes UNet weights (``model.diffusion_model.*``); 0 when it changes none.

    A bake writes the LoRA into the weights loaders use by default; the EMA copies keep the base's values, so a
    loader that swaps them in (``use_ema``, some training scripts) sees the base. `plan` says so; not an error.
    """
    if not any(key.startswith(UNET_PREFIX) for key in target.applications):
        return 0
    try:
        with open_safetensors(target.structure_path) as structure:
            return sum(1 for key in structure.names() if key.startswith(EMA_PREFIX) and key not in EMA_SCALAR_KEYS)
    except (OSError, FormatError):  # a warning never stops a plan; the bake reports an unreadable base itself
        return 0
