"""What a build will do, decided before any tensor is computed.

A plan is immutable data: the executor reads it, the `plan` command renders
it. Every mapping here is built in a defined order (recipe order, then module
name) so that iterating it is reproducible.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from loraforge.formats.adapters import AdapterFile, AdapterModule
from loraforge.formats.arch.block_weights import BlockWeights
from loraforge.formats.arch import Detection
from loraforge.formats.arch.table import ModuleSpec
from loraforge.plan.target import PlannedTarget, Produces
from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.local import ResolvedInput
from loraforge.resolve.lockfile import Lock


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
    # Text-encoder modules skipped at te: 0 because the base holds no text encoder (plan/ingredients.py).
    not_in_base: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModuleApplication:
    """One adapter module added to one checkpoint weight (or a row slice of it)."""

    ingredient: int  # index into BakeTarget.ingredients
    module: AdapterModule
    spec: ModuleSpec
    coefficient: float  # strength (or te) x block weight
    part: str = "weight"  # "weight", or "bias" for a full diff's diff_b
    dora: str | None = None  # a DoRA module's strength convention, "lycoris" or "peft" (docs/adapters.md)


@dataclass(frozen=True, kw_only=True)
class BakeTarget(PlannedTarget):
    """A `kind: checkpoint` target: LoRAs baked into a base checkpoint."""

    kind: ClassVar[str] = "checkpoint"
    produces: ClassVar[Produces] = "checkpoint"

    base: str  # input or target name
    base_path: Path  # the file the base will be read from (a target's output for chains)
    structure_path: Path  # a file with the base's tensor layout, readable at plan time
    detection: Detection
    save: str  # "same" or a safetensors dtype code ("F16", "BF16", "F32")
    ingredients: tuple[LoraIngredient, ...]
    applications: Mapping[str, tuple[ModuleApplication, ...]]  # checkpoint key -> in order
    merge: Any = None  # plan/checkpoint_merge.py CheckpointMergePlan when the target starts from `merge:`

    @property
    def device_class(self) -> str | None:
        return self.merge.device_class if self.merge is not None else None  # non-linear merges only

    def checkpoint_structure(self) -> tuple[Path, Detection, str]:
        return self.structure_path, self.detection, self.save  # the base's layout: a bake keeps every name and shape

    def modules_per_block(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for applications in self.applications.values():
            counts.update(a.spec.block for a in applications)
        return {block: counts[block] for block in self.architecture.full_block_form if counts[block]}


@dataclass(frozen=True)
class BuildPlan:
    """Every selected target in dependency order, with its resolved inputs, as planned before the build.

    Nothing here changes during a build: the build keeps its own state
    (execute/state.py) and plans a target again from its producers' real
    outputs with ``plan/planner.replan_target``, a pure function of this plan.
    """

    loaded: LoadedRecipe
    inputs: Mapping[str, ResolvedInput]
    input_sha256: Mapping[str, str]
    targets: tuple[PlannedTarget, ...]
    kinds: Any  # plan/kinds.py TargetKinds: the registry this plan was made with
    skipped: tuple[str, ...] = field(default=())  # targets not selected on the command line
    state: Mapping[str, str] = field(default_factory=dict)  # target -> plan/status.py state
    context: Any = None  # the PlanContext as planning left it (read-only from here on)
    lock: Lock | None = None  # <recipe>.lock as read when planning: the one the build starts from

    def target(self, name: str) -> PlannedTarget:
        """The target as planned before the build."""
        return next(t for t in self.targets if t.name == name)
