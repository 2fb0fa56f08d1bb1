"""Action keys: one hash that changes whenever a target's output could change.

The key covers the operation, the target's canonical parameters (with the
effective precision), the content hashes of its inputs (for a target input,
that target's own action key, which transitively covers its inputs), and the
loraforge version. Devices are left out for bakes: their bytes do not depend on
the device (float64 accumulation, one rounding).
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

from loraforge import __version__
from loraforge.recipe.loader import LoadedRecipe

# Bump when the numeric recipe of an operation changes in a way that changes bytes.
BAKE_NUMERIC_POLICY = "bake-v2: float64 delta and accumulation, one correct (round-to-odd, nearest-even) rounding to the save dtype"


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def bake_action_key(loaded: LoadedRecipe, target: str, input_keys: Mapping[str, str]) -> str:
    recipe = loaded.recipe
    payload = {
        "operation": "bake",
        "target": target,
        "parameters": json.loads(target_parameters_json(loaded, target)),
        "inputs": dict(sorted(input_keys.items())),
        "numeric_policy": BAKE_NUMERIC_POLICY,
        "loraforge": __version__,
        "recipe": recipe.model_dump(mode="json", include={"name", "title", "date", "seed"}),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def target_parameters_json(loaded: LoadedRecipe, target: str) -> str:
    """The target's recipe entry with defaults and its effective precision, canonical JSON."""
    recipe = loaded.recipe
    spec = recipe.targets[target].model_dump(mode="json")
    spec["precision"] = recipe.effective_precision(target).model_dump(mode="json")
    spec.pop("device", None)  # bake bytes do not depend on the device
    spec.pop("output", None)  # where the file goes does not change its bytes
    return canonical_json(spec)
