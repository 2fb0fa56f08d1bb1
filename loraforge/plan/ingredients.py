"""Planning one entry of a target's ``loras:`` list; shared by bakes and merges.

An entry names an adapter: a recipe input, or another target whose output is
a LoRA (a merge, say), described before it is built by the producer's
``lora_adapter()``. Planning parses the adapter's header, matches every module
onto an architecture, evaluates block weights and records the coefficient
(strength or te, times the block weight) of each module. Anything that maps
to nothing is an error unless the target allows it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraforge.errors import FormatError
from loraforge.formats.adapters import AdapterFile, dora_convention, parse_adapter
from loraforge.formats.adapters.matching import detect_adapter_architecture, match_adapter
from loraforge.formats.adapters.model import component_of
from loraforge.formats.arch.block_weights import BlockWeightError, parse_block_weights
from loraforge.formats.arch.table import Architecture
from loraforge.formats.pickle_input import safetensors_input
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.plan.model import LoraIngredient, ModuleApplication
from loraforge.plan.target import PRODUCT_WORDS, PlannedTarget
from loraforge.resolve.hash_cache import cache_root
from loraforge.resolve.local import ResolvedInput

MAX_LISTED = 8  # how many offending keys an error message lists before "and N more"


@dataclass(frozen=True)
class AdapterSource:
    """Where an ingredient's adapter comes from, parsed (or, for a target's output, planned)."""

    use: str  # the input or target name
    path: Path  # the file read at build time
    adapter: AdapterFile
    size: int  # bytes of ``path`` (estimated for a target not built yet)
    architecture: Architecture | None = None  # known when a target produces it
    factor_dtypes: tuple[str, ...] = ()  # dtype codes of the factor tensors (alphas excluded), sorted


def input_file(loaded, resolved: ResolvedInput, sha256: str) -> Path:
    """The safetensors file to open for an input; a pickle is refused unless its input sets `allow_pickle`.

    An allowed pickle is converted once into the cache (formats/pickle_input.py).
    """
    allow = loaded.recipe.inputs[resolved.name].allow_pickle
    try:
        return safetensors_input(resolved.path, sha256, allow, cache_root() / "converted")
    except FormatError as error:
        raise loaded.error(("inputs", resolved.name, "source"), str(error)) from None


def adapter_source(context, where: tuple, use: str) -> AdapterSource:
    """The adapter an entry names; ``where`` is the entry's recipe path (for errors).

    A target's output that is built and current is read like an input; one
    that is not built yet is described by its producer's ``lora_adapter()``
    (the build plans the entry again from the real file once it exists).
    """
    loaded = context.loaded
    if use in context.built:
        built = context.built[use].path
        return _parsed_adapter(loaded, where, use, built, f"the output of target '{use}' ({built})")
    if use in context.planned:
        return _planned_adapter(loaded, where, use, context.planned[use])
    if use in loaded.recipe.targets:
        raise loaded.error((*where, "use"), f"target '{use}' is not planned before this one.")
    path = input_file(loaded, context.inputs[use], context.input_sha256[use])
    return _parsed_adapter(loaded, where, use, path, f"input '{use}'")


def _planned_adapter(loaded, where: tuple, use: str, producer: PlannedTarget) -> AdapterSource:
    if producer.produces != "lora":
        raise loaded.error(
            (*where, "use"),
            f"target '{use}' is a `kind: {producer.kind}` target and produces a {PRODUCT_WORDS[producer.produces]}, not a LoRA, "
            "so it cannot be used as a LoRA here.",
            "Name a LoRA input, or a target of this recipe that produces a LoRA (`kind: lora` or `kind: extract`).",
        )
    # Every kind that produces a LoRA plans its output's modules and dtype (plan/target.py).
    return AdapterSource(
        use, producer.output, producer.lora_adapter(), producer.write_bytes, producer.architecture, (producer.lora_dtype,)
    )


def _parsed_adapter(loaded, where: tuple, use: str, path: Path, described: str) -> AdapterSource:
    try:
        with open_safetensors(path) as adapter_file:
            adapter = parse_adapter(adapter_file)
            dtypes = {
                adapter_file.info(key).dtype for m in adapter.modules for role, key in m.keys.items() if role != "alpha"
            }
    except FormatError as error:
        raise loaded.error((*where, "use"), f"{described} is not a usable adapter: {error}") from None
    return AdapterSource(use, path, adapter, path.stat().st_size, None, tuple(sorted(dtypes)))


def plan_ingredient(
    loaded,
    target: str,
    index: int,
    source: AdapterSource,
    arch: Architecture,
    *,
    allow_unmatched: bool,
    base_label: str,
) -> tuple[LoraIngredient, list[ModuleApplication]]:
    """Match entry ``index`` of ``target`` onto ``arch``; ``base_label`` names what defines arch in errors."""
    lora = loaded.recipe.targets[target].loras[index]
    where = ("targets", target, "loras", index)
    adapter = source.adapter
    if not adapter.modules and not adapter.unclaimed:  # never a bake or merge that silently changes nothing
        raise loaded.error(
            (*where, "use"),
            f"'{lora.use}' ({source.path.name}) holds no adapter tensors at all, so applying it would change nothing.",
            "Check that the file is the LoRA you meant (a failed export can leave an empty file), or remove this entry.",
        )
    match = match_adapter(adapter, arch)
    if adapter.modules and not match.matched:
        raise loaded.error((*where, "use"), _architecture_mismatch(adapter, lora.use, arch, base_label))
    if match.shape_mismatches:
        raise loaded.error((*where, "use"), _shape_mismatch_message(lora.use, adapter, match.shape_mismatches, arch))
    _check_one_module_per_layer(loaded, where, lora.use, adapter, match.matched)
    blocks = _block_weights(loaded, (*where, "blocks"), lora.blocks, arch)
    te = lora.strength if lora.te is None else lora.te
    not_in_base = _text_encoder_modules_without_encoder(match.unmatched, arch)
    if not_in_base and te != 0.0 and not allow_unmatched:
        raise loaded.error(
            (*where, "te") if lora.te is not None else (*where, "use"),
            f"{len(not_in_base)} text-encoder module(s) of '{lora.use}' ({source.path.name}) have nothing to change: "
            f"the {arch.title} {base_label} holds no text encoder (e.g. BFL's transformer-only file), so baking them "
            f"would silently drop them: {listing(not_in_base)}.",
            "Set `te: 0` on this LoRA to bake the rest and skip them knowingly (load the LoRA's text-encoder part at "
            "inference), or bake into a checkpoint that includes the text encoders.",
        )
    if te == 0.0:  # skipped knowingly, and accounted for in the plan (not_in_base)
        skipped = set(not_in_base)
        unmatched_modules = [m for m in match.unmatched if m.name not in skipped]
    else:
        not_in_base, unmatched_modules = (), match.unmatched
    unmatched = tuple(sorted([m.name for m in unmatched_modules] + list(adapter.unclaimed)))
    if unmatched and not allow_unmatched:
        raise loaded.error(
            (*where, "use"),
            f"{len(unmatched)} key(s) of '{lora.use}' ({source.path.name}) map to nothing in the "
            f"{arch.title} {base_label}: {listing(unmatched)}.",
            "Check that the LoRA was made for this base model, or set `allow_unmatched: true` on the "
            "target to skip them (they are then listed by `loraforge plan`).",
        )
    applications = []
    for module, module_spec in match.matched:
        try:
            weight = blocks.weight(module_spec.block)
        except BlockWeightError as error:
            raise loaded.error((*where, "blocks"), f"{error} (module {module.name} of '{lora.use}')") from None
        coefficient = (te if module_spec.is_text_encoder else lora.strength) * weight
        if coefficient != 0.0:
            convention = dora_convention(module, lora.dora) if module.dora else None
            applications.append(ModuleApplication(index, module, module_spec, coefficient, dora=convention))
            if module.has_bias:
                _check_bias_target(loaded, where, lora.use, module, module_spec)
                applications.append(ModuleApplication(index, module, module_spec, coefficient, part="bias"))
    ingredient = LoraIngredient(
        index=index,
        use=lora.use,
        path=source.path,
        strength=lora.strength,
        te=te,
        blocks=blocks,
        adapter=adapter,
        matched=len(match.matched),
        applied=len(applications),
        unmatched=unmatched,
        not_in_base=tuple(sorted(not_in_base)),
        blocks_used=dict(sorted(Counter(s.block for _, s in match.matched).items())),
    )
    return ingredient, applications


def _text_encoder_modules_without_encoder(unmatched, arch: Architecture) -> tuple[str, ...]:
    """Names of unmatched text-encoder modules when the architecture holds no text encoder at all (a Flux
    transformer-only file): they are not the wrong model's, there is just nothing here for them to change."""
    if not unmatched or any(spec.is_text_encoder for spec in arch.modules):
        return ()
    return tuple(m.name for m in unmatched if component_of(m.name) not in ("unet", None, ""))


def _check_one_module_per_layer(loaded, where, use, adapter, matched) -> None:
    """Two modules of one file landing on the same rows of one layer (kohya and diffusers names mixed, or
    Flux's fused ``img_attn.qkv`` next to a split ``attn.to_q``) would apply those rows twice."""
    seen: dict[str, list[tuple[float, float, str]]] = {}
    for module, spec in matched:
        start, stop = spec.rows if spec.rows is not None else (0, math.inf)
        for other_start, other_stop, other in seen.get(spec.key, ()):
            if start < other_stop and other_start < stop:
                raise loaded.error(
                    (*where, "use"),
                    f"modules {other} and {module.name} of '{use}' ({adapter.path}) both adapt {spec.key}"
                    f"{'' if spec.rows is None else f' (rows {start}:{stop})'}: the file holds that layer twice "
                    "(mixed export formats), and baking both would apply it twice.",
                    "Remove one set of keys from the file, or re-export the adapter with one tool.",
                )
        seen.setdefault(spec.key, []).append((start, stop, module.name))


def _check_bias_target(loaded, where, use, module, spec) -> None:
    if spec.bias_key is None:
        raise loaded.error(
            (*where, "use"),
            f"module {module.name} of '{use}' carries a bias difference (diff_b), but {spec.key} has no bias "
            "in this architecture.",
            "The file was made for another model; use a diff made against this base.",
        )


def _block_weights(loaded, where, spec, arch):
    try:
        return parse_block_weights(spec, arch)
    except BlockWeightError as error:
        raise loaded.error(where, str(error)) from None


def _architecture_mismatch(adapter: AdapterFile, use: str, arch, base_label: str) -> str:
    try:
        other = detect_adapter_architecture(adapter)
        seen = f"it looks like a {other.title} adapter"
    except FormatError:
        seen = "its modules match no supported architecture"
    return (
        f"no module of '{use}' ({adapter.path}) matches the {arch.title} {base_label}: {seen}. "
        "Use a LoRA made for the base's architecture, or a base of the LoRA's architecture."
    )


def _shape_mismatch_message(use, adapter, mismatches, arch) -> str:
    described = [f"{m.name} gives {tuple(m.delta_shape)}, {s.key} needs {tuple(s.shape)}" for m, s in mismatches]
    try:  # names shared across families (text-encoder spellings) can match where the shapes cannot
        other = detect_adapter_architecture(adapter)
    except FormatError:
        other = None
    if other is not None and other.name != arch.name:
        why = (f"It looks like a {other.title} adapter, not one for the {arch.title} base: use a LoRA made for the "
               "base's architecture, or a base of the LoRA's architecture.")
    else:
        why = "The LoRA was made for a different model size or variant."
    return (
        f"{len(mismatches)} module(s) of '{use}' ({adapter.path}) have shapes that do not fit the base: "
        f"{listing(described)}. {why}"
    )


def listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
