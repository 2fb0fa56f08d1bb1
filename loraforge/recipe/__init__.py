"""Recipe files: the pydantic schema and the YAML loader with positioned errors."""

from loraforge.recipe.loader import MAX_RECIPE_BYTES, LoadedRecipe, RecipeProblem, load_recipe, recipe_error
from loraforge.recipe.schema import (
    SCHEMA_VERSION,
    TARGET_KINDS,
    CheckpointTarget,
    ExtractTarget,
    InputSpec,
    LoraUse,
    Precision,
    PrecisionOverride,
    RankSpec,
    Recipe,
    Target,
)
from loraforge.recipe.sources import SourceRef, SourceSyntaxError, parse_source

__all__ = [
    "MAX_RECIPE_BYTES",
    "SCHEMA_VERSION",
    "TARGET_KINDS",
    "CheckpointTarget",
    "ExtractTarget",
    "InputSpec",
    "LoadedRecipe",
    "LoraUse",
    "Precision",
    "PrecisionOverride",
    "RankSpec",
    "Recipe",
    "RecipeProblem",
    "SourceRef",
    "SourceSyntaxError",
    "Target",
    "load_recipe",
    "parse_source",
    "recipe_error",
]
