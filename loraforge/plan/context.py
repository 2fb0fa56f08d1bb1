"""What every target planner sees: the recipe, the located inputs, the targets planned so far."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.local import ResolvedInput


@dataclass
class PlanContext:
    loaded: LoadedRecipe
    inputs: dict[str, ResolvedInput]  # input name -> located file
    input_sha256: dict[str, str]  # input name -> verified sha256
    planned: dict[str, Any]  # target name -> planned target, in dependency order
