"""Map adapter modules onto an architecture's LoRA-targetable modules, and guess the architecture."""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.errors import FormatError
from loraforge.formats.arch import ARCHITECTURE_NAMES, Architecture, ModuleSpec, get_architecture, get_family
from loraforge.ops.deltas import delta_fits

from . import aliases, flux_names
from .kinds import adapter_kind
from .model import AdapterFile, AdapterModule


@dataclass(frozen=True)
class AdapterMatch:
    """How one adapter lands on one architecture; every module is in exactly one of the three lists."""

    matched: tuple[tuple[AdapterModule, ModuleSpec], ...]
    unmatched: tuple[AdapterModule, ...]  # name not in the architecture
    shape_mismatches: tuple[tuple[AdapterModule, ModuleSpec], ...]  # name found, ΔW does not fit


def find_spec(module: AdapterModule, arch: Architecture) -> ModuleSpec | None:
    """The architecture module an adapter module names, by kohya or diffusers name (aliases.py).

    Besides the canonical names this accepts the spellings current tools
    write: text-encoder paths without transformers' ``text_model`` level,
    ``lora_te1_`` for a one-encoder model, and kohya UNet names in the other
    naming (diffusers paths on SDXL, LDM paths on SD 1/2). diffusers names
    without a component prefix (a UNet saved on its own with
    ``save_lora_adapter``) are looked up as UNet modules.
    """
    if arch.name == flux_names.FAMILY:  # Flux's dialects, split q/k/v rows included (flux_names.py)
        return flux_names.lookup(module.name, arch)
    return aliases.lookup(module.name, module.naming, arch)


def match_adapter(adapter: AdapterFile, arch: Architecture) -> AdapterMatch:
    matched, unmatched, mismatched = [], [], []
    for module in adapter.modules:
        spec = find_spec(module, arch)
        if spec is None:
            unmatched.append(module)
        elif delta_fits(module.delta_shape, spec.shape):
            matched.append((module, spec))
        else:
            mismatched.append((module, spec))
    return AdapterMatch(tuple(matched), tuple(unmatched), tuple(mismatched))


def candidate_architectures(adapter: AdapterFile | None = None) -> tuple[Architecture, ...]:
    """Every table detection considers, in tie-break order: per family (sd1, sd2, sdxl) the released
    model, then the family at the dimensions the adapter's module shapes imply (where those differ)."""
    result = []
    for name in ARCHITECTURE_NAMES:
        full = get_architecture(name)
        result.append(full)
        if adapter is not None:
            shapes = {spec.key: tuple(m.delta_shape) for m in adapter.modules if (spec := find_spec(m, full))}
            scaled = get_architecture(name, get_family(name).infer(shapes))
            if scaled is not full:
                result.append(scaled)
    return tuple(result)


# Kinds whose ΔW shape is the layer's own (a 1x1 conv's LoRA is 4-D); LoHa and LoKr flatten convs.


def detect_adapter_architecture(adapter: AdapterFile) -> Architecture:
    """The architecture (name and dimensions) on which most modules land with fitting shapes.

    Ties go to fewer shape mismatches, then to a released (full-size) model, then (between scaled
    models, where widths tell SD1 from SD2 no more) to more exact shapes - SD1's 1x1-conv proj_in
    against SD2's linear one - then to the earlier candidate
    (:func:`candidate_architectures`). SD1 and SD2 share module names; their
    cross-attention and text-encoder widths (768 vs 1024) tell them apart, so
    an adapter that touches only self-attention can be ambiguous and reads as SD1.
    """
    best: tuple[int, int, int] | None = None
    best_arch: Architecture | None = None
    for order, arch in enumerate(candidate_architectures(adapter)):
        match = match_adapter(adapter, arch)
        full = arch.size == "full"
        exact = 0 if full else sum(
            1 for m, spec in match.matched if adapter_kind(m.kind).exact_shape and tuple(m.delta_shape) == spec.shape
        )
        score = (len(match.matched), -len(match.shape_mismatches), full, exact, -order)
        if match.matched and (best is None or score > best):
            best, best_arch = score, arch
    if best_arch is None:
        first = ", ".join(m.name for m in adapter.modules[:3]) or ", ".join(adapter.unclaimed[:3]) or "(none)"
        raise FormatError(
            f"no module of {adapter.path} matches SD1/SD2/SDXL/Flux.1 (names and shapes); first modules: {first}. "
            "The adapter is for another model family, or uses a naming loraforge does not know; check where "
            "it came from."
        )
    return best_arch
