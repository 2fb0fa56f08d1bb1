"""What a build will do, decided before any tensor is computed.

A plan is immutable data: the executor reads it, the `plan` command renders
it. Every mapping here is built in a defined order (recipe order, then module
name) so that iterating it is reproducible.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from loraforge.formats.adapters import AdapterFile, AdapterModule
from loraforge.formats.arch.block_weights import BlockWeights
from loraforge.formats.arch import Detection
from loraforge.formats.arch.table import Architecture, ModuleSpec
from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.local import ResolvedInput


@dataclass(frozen=True)
class LoraIngredient:
    """One entry of a target's ``loras:`` list, resolved and matched."""

    index: int  # position in the recipe's list
    use: str  # the input it names
    path: Path
    strength: float
    te: float
    blocks: BlockWeights
    adapter: AdapterFile
    matched: int  # adapter modules that land on a checkpoint weight
    applied: int  # of those, modules with a non-zero coefficient
    unmatched: tuple[str, ...]  # adapter modules / keys that land nowhere
    blocks_used: Mapping[str, int]  # block id -> matched module count


@dataclass(frozen=True)
class ModuleApplication:
    """One adapter module added to one checkpoint weight (or a row slice of it)."""

    ingredient: int  # index into BakeTarget.ingredients
    module: AdapterModule
    spec: ModuleSpec
    coefficient: float  # strength (or te) x block weight
    part: str = "weight"  # "weight", or "bias" for a full diff's diff_b


@dataclass(frozen=True)
class BakeTarget:
    """A `kind: checkpoint` target: LoRAs baked into a base checkpoint."""

    name: str
    base: str  # input or target name
    base_path: Path  # the file the base will be read from (a target's output for chains)
    structure_path: Path  # a file with the base's tensor layout, readable at plan time
    output: Path
    detection: Detection
    save: str  # "same" or a safetensors dtype code ("F16", "BF16", "F32")
    device: str  # "auto" | "cpu" | "cuda" | "cuda:N"
    ingredients: tuple[LoraIngredient, ...]
    applications: Mapping[str, tuple[ModuleApplication, ...]]  # checkpoint key -> in order
    dependencies: tuple[str, ...]  # targets that must be built first
    action_key: str | None  # None while a target it reads is not built yet
    read_bytes: int
    write_bytes: int
    memory_bytes: int  # estimated peak memory while building (for --jobs)

    @property
    def architecture(self) -> Architecture:
        return self.detection.architecture

    def modules_per_block(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for applications in self.applications.values():
            counts.update(a.spec.block for a in applications)
        return {block: counts[block] for block in self.architecture.full_block_form if counts[block]}


@dataclass(frozen=True)
class BuildPlan:
    """Every selected target in dependency order, with its resolved inputs."""

    loaded: LoadedRecipe
    inputs: Mapping[str, ResolvedInput]
    input_sha256: Mapping[str, str]
    targets: tuple[BakeTarget, ...]
    skipped: tuple[str, ...] = field(default=())  # targets not selected on the command line
    state: Mapping[str, str] = field(default_factory=dict)  # target -> plan/status.py state
    context: Any = None  # the PlanContext, kept so the build can re-plan a target once its producers exist

    def read_hashes(self, name: str) -> dict[str, str]:
        """sha256 of every input and target output that target ``name`` reads (for provenance)."""
        if self.context is not None:
            hashes = self.context.input_hashes(name)
            if hashes is not None:
                return hashes
        return {d: self.input_sha256[d] for d in self.loaded.recipe.dependencies(name) if d in self.input_sha256}

    def target(self, name: str) -> BakeTarget:
        """The target as planned now: the build plans a target again once the targets it reads are built."""
        if self.context is not None and name in self.context.planned:
            return self.context.planned[name]
        return next(t for t in self.targets if t.name == name)
