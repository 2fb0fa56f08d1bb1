"""Planning a `kind: checkpoint` target: base, ingredients, module matching.

For each LoRA entry: parse the adapter's header, match every module onto the
base architecture's table, evaluate block weights, and record which modules
land on which checkpoint key with which coefficient. Anything that maps to
nothing is an error unless the target allows it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from loraforge.errors import FormatError
from loraforge.formats.adapters import AdapterFile, parse_adapter
from loraforge.formats.adapters.matching import detect_adapter_architecture, match_adapter
from loraforge.formats.arch import Detection, detect_architecture
from loraforge.formats.arch.block_weights import BlockWeightError, parse_block_weights
from loraforge.formats.dtypes import precision_code
from loraforge.formats.pickle_input import safetensors_input
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.plan.action_key import bake_action_key
from loraforge.plan.context import PlanContext
from loraforge.plan.layout import output_layout
from loraforge.plan.model import BakeTarget, LoraIngredient, ModuleApplication
from loraforge.resolve.hash_cache import cache_root
from loraforge.resolve.local import ResolvedInput

MAX_LISTED = 8  # how many offending keys an error message lists before "and N more"


def plan_bake(context: PlanContext, name: str) -> BakeTarget:
    """Plan a `kind: checkpoint` target: its base, and every LoRA module's landing place."""
    loaded, inputs, input_sha256, planned = context.loaded, context.inputs, context.input_sha256, context.planned
    recipe = loaded.recipe
    spec = recipe.targets[name]
    base_path, structure_path, detection, base_bytes = _plan_base(loaded, name, inputs, planned, input_sha256)
    ingredients, applications = [], {}
    for index, lora in enumerate(spec.loras):
        ingredient, module_applications = _plan_ingredient(loaded, name, index, inputs, detection, input_sha256)
        ingredients.append(ingredient)
        for application in module_applications:
            key = application.spec.bias_key if application.part == "bias" else application.spec.key
            applications.setdefault(key, []).append(application)
    precision = recipe.effective_precision(name)
    save = "same" if precision.save == "same" else precision_code(precision.save)
    dependency_keys = {d: planned[d].action_key for d in recipe.dependencies(name) if d in planned}
    dependency_hashes = {d: input_sha256[d] for d in recipe.dependencies(name) if d in input_sha256}
    ordered = {key: tuple(applications[key]) for key in sorted(applications)}
    return BakeTarget(
        name=name,
        base=spec.base,
        base_path=base_path,
        structure_path=structure_path,
        output=recipe.output_path(name, loaded.root).resolve(),
        detection=detection,
        save=save,
        device=recipe.effective_device(name),
        ingredients=tuple(ingredients),
        applications=ordered,
        dependencies=tuple(d for d in recipe.dependencies(name) if d in recipe.targets),
        action_key=bake_action_key(loaded, name, {**dependency_hashes, **dependency_keys}),
        read_bytes=base_bytes + sum(i.path.stat().st_size for i in ingredients),
        write_bytes=_estimated_output_bytes(structure_path, save),
    )


def _plan_base(loaded, name, inputs, planned, input_sha256) -> tuple[Path, Path, Detection, int]:
    """Where the base comes from and what architecture it is."""
    base = loaded.recipe.targets[name].base
    if base in planned:
        producer = planned[base]
        return producer.output, producer.structure_path, producer.detection, producer.write_bytes
    if base in loaded.recipe.targets:
        raise loaded.error(("targets", name, "base"), f"target '{base}' cannot be used as a base here.")
    path = input_file(loaded, inputs[base], input_sha256[base])
    try:
        with open_safetensors(path) as base_file:
            shapes = {n: base_file.info(n).shape for n in base_file.names()}
        detection = detect_architecture(shapes)
    except FormatError as error:
        raise loaded.error(("targets", name, "base"), f"base '{base}' is not a usable checkpoint: {error}") from None
    return path, path, detection, path.stat().st_size


def _plan_ingredient(loaded, target, index, inputs, detection, input_sha256) -> tuple[LoraIngredient, list[ModuleApplication]]:
    spec = loaded.recipe.targets[target]
    lora = spec.loras[index]
    where = ("targets", target, "loras", index)
    if lora.use in loaded.recipe.targets:
        raise loaded.error(
            (*where, "use"),
            f"target '{lora.use}' produces a checkpoint, not a LoRA, so it cannot be baked in.",
            "Name a LoRA input (or a LoRA-producing target) here.",
        )
    resolved = inputs[lora.use]
    path = input_file(loaded, resolved, input_sha256[lora.use])
    adapter = _parse_adapter(loaded, where, resolved, path)
    arch = detection.architecture
    match = match_adapter(adapter, arch)
    if adapter.modules and not match.matched:
        raise loaded.error((*where, "use"), _architecture_mismatch(adapter, lora.use, arch, spec.base))
    if match.shape_mismatches:
        raise loaded.error((*where, "use"), _shape_mismatch_message(lora.use, adapter, match.shape_mismatches))
    unmatched = tuple(sorted([m.name for m in match.unmatched] + list(adapter.unclaimed)))
    if unmatched and not spec.allow_unmatched:
        raise loaded.error(
            (*where, "use"),
            f"{len(unmatched)} key(s) of '{lora.use}' ({resolved.path.name}) map to nothing in the "
            f"{arch.title} base: {_listing(unmatched)}.",
            "Check that the LoRA was made for this base model, or set `allow_unmatched: true` on the "
            "target to skip them (they are then listed by `loraforge plan`).",
        )
    blocks = _block_weights(loaded, (*where, "blocks"), lora.blocks, arch)
    te = lora.strength if lora.te is None else lora.te
    applications = []
    for module, module_spec in match.matched:
        try:
            weight = blocks.weight(module_spec.block)
        except BlockWeightError as error:
            raise loaded.error((*where, "blocks"), f"{error} (module {module.name} of '{lora.use}')") from None
        coefficient = (te if module_spec.is_text_encoder else lora.strength) * weight
        if coefficient != 0.0:
            applications.append(ModuleApplication(index, module, module_spec, coefficient))
            if module.has_bias:
                _check_bias_target(loaded, where, lora.use, module, module_spec)
                applications.append(ModuleApplication(index, module, module_spec, coefficient, part="bias"))
    ingredient = LoraIngredient(
        index=index,
        use=lora.use,
        path=path,
        strength=lora.strength,
        te=te,
        blocks=blocks,
        adapter=adapter,
        matched=len(match.matched),
        applied=len(applications),
        unmatched=unmatched,
        blocks_used=dict(sorted(Counter(s.block for _, s in match.matched).items())),
    )
    return ingredient, applications


def _check_bias_target(loaded, where, use, module, spec) -> None:
    if spec.bias_key is None:
        raise loaded.error(
            (*where, "use"),
            f"module {module.name} of '{use}' carries a bias difference (diff_b), but {spec.key} has no bias "
            "in this architecture.",
            "The file was made for another model; use a diff made against this base.",
        )


def _parse_adapter(loaded, where, resolved: ResolvedInput, path: Path) -> AdapterFile:
    try:
        with open_safetensors(path) as adapter_file:
            return parse_adapter(adapter_file)
    except FormatError as error:
        raise loaded.error((*where, "use"), f"input '{resolved.name}' is not a usable adapter: {error}") from None


def input_file(loaded, resolved: ResolvedInput, sha256: str) -> Path:
    """The safetensors file to open for an input; a pickle is refused unless its input sets `allow_pickle`.

    An allowed pickle is converted once into the cache (formats/pickle_input.py).
    """
    allow = loaded.recipe.inputs[resolved.name].allow_pickle
    try:
        return safetensors_input(resolved.path, sha256, allow, cache_root() / "converted")
    except FormatError as error:
        raise loaded.error(("inputs", resolved.name, "source"), str(error)) from None


def _block_weights(loaded, where, spec, arch):
    try:
        return parse_block_weights(spec, arch)
    except BlockWeightError as error:
        raise loaded.error(where, str(error)) from None


def _architecture_mismatch(adapter: AdapterFile, use: str, arch, base: str) -> str:
    try:
        other = detect_adapter_architecture(adapter)
        seen = f"it looks like a {other.title} adapter"
    except FormatError:
        seen = "its modules match no supported architecture"
    return (
        f"no module of '{use}' ({adapter.path}) matches the {arch.title} base '{base}': {seen}. "
        "Use a LoRA made for the base's architecture, or a base of the LoRA's architecture."
    )


def _shape_mismatch_message(use, adapter, mismatches) -> str:
    described = [f"{m.name} gives {tuple(m.delta_shape)}, {s.key} needs {tuple(s.shape)}" for m, s in mismatches]
    return (
        f"{len(mismatches)} module(s) of '{use}' ({adapter.path}) have shapes that do not fit the base: "
        f"{_listing(described)}. The LoRA was made for a different model size or variant."
    )


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _estimated_output_bytes(structure_path: Path, save: str) -> int:
    with open_safetensors(structure_path) as base_file:
        layout = output_layout(base_file, save)
    return sum(entry.nbytes for entry in layout)
