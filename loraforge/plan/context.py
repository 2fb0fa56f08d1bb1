"""What every target planner sees: the recipe, the located inputs, the targets planned so far.

Filled while plan_build plans targets in order; a build never changes it (it
re-plans from a copy: plan/planner.replan_target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.local import ResolvedInput


@dataclass(frozen=True)
class BuiltOutput:
    """A target's output that exists and is current: dependents read it like an input."""

    path: Path
    sha256: str


@dataclass
class PlanContext:
    loaded: LoadedRecipe
    inputs: dict[str, ResolvedInput]  # input name -> located file
    input_sha256: dict[str, str]  # input name -> verified sha256
    planned: dict[str, Any]  # target name -> planned target, in dependency order
    kinds: Any  # plan/kinds.py TargetKinds: how each target kind is planned
    built: dict[str, BuiltOutput] = field(default_factory=dict)  # targets whose output is current
    output_dir: Path | None = None  # verify: every output goes under here instead of the recipe folder
    device: str | None = None  # the CLI's --device, over the recipe's
    lock_targets: dict[str, dict] = field(default_factory=dict)  # the lock's `targets` section when planning

    def input_hashes(self, name: str) -> dict[str, str] | None:
        """sha256 of everything target ``name`` reads (an input's file, a target's output).

        None while a target it reads is not built yet: its output hash, and so
        this target's action key, is known only after that build.
        """
        hashes = {}
        for dep in self.loaded.recipe.dependencies(name):
            if dep in self.input_sha256:
                hashes[dep] = self.input_sha256[dep]
            elif dep in self.built:
                hashes[dep] = self.built[dep].sha256
            else:
                return None
        return hashes

    def built_dependencies(self, name: str) -> dict[str, str]:
        """The targets ``name`` reads that are built, with their output sha256."""
        recipe = self.loaded.recipe
        return {d: self.built[d].sha256 for d in recipe.dependencies(name) if d in recipe.targets and d in self.built}

    def output_path(self, name: str) -> Path:
        """Where target ``name`` writes (redirected under ``output_dir`` for verify)."""
        recipe, root = self.loaded.recipe, self.loaded.root
        path = recipe.output_path(name, root).resolve()
        if self.output_dir is None:
            return path
        return Path(self.output_dir) / path.relative_to(root.resolve())

    def device_of(self, name: str) -> str:
        return self.device or self.loaded.recipe.effective_device(name)
