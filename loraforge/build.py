"""The library's entry points: plan a recipe with every registered target kind, then build it.

``plan_build`` is plan/planner.py's with the registry of loraforge/targets/
filled in; ``drive_build`` (execute/driver.py) builds a plan the way the
``build``, ``release`` and ``verify`` commands do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from loraforge.execute.driver import drive_build
from loraforge.plan import planner
from loraforge.plan.model import BuildPlan
from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.resolver import ResolveOptions
from loraforge.targets.registry import TARGET_KINDS

__all__ = ["drive_build", "plan_build", "TARGET_KINDS"]


def plan_build(
    loaded: LoadedRecipe,
    selected: Sequence[str] = (),
    resolve: ResolveOptions | None = None,
    *,
    device: str | None = None,
    output_dir: Path | None = None,
) -> BuildPlan:
    """Plan the selected targets (all when none are named) and what they depend on."""
    return planner.plan_build(loaded, selected, resolve, kinds=TARGET_KINDS, device=device, output_dir=output_dir)
