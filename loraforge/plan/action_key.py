"""Action keys: one hash that changes whenever a target's output could change.

The key covers the operation, the target's canonical parameters (with the
effective precision), what its output records about the recipe (title,
date, recipe slice: plan/provenance.py), the content hashes of everything it reads (for an
input its sha256; for another target, that target's *output* sha256, so a
producer rebuilt to the same bytes leaves its dependents up to date), the
numeric policy and the loraforge version. Steps whose bytes depend on the
device class (SVDs) add it through ``extra``; bakes and concats do not: their
bytes are the same on every device (float64 accumulation, one rounding).
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

from loraforge import __version__
from loraforge.canonical import canonical_json
from loraforge.plan.provenance import recorded_fields, target_parameters_json
from loraforge.recipe.loader import LoadedRecipe

# Bump when the numeric recipe of an operation changes in a way that changes bytes.
BAKE_NUMERIC_POLICY = (
    "bake-v3: each element RN(exact W + sum of coefficient x scale x dW) in the save dtype, round half to even, "
    "certified (float64 sum with a rigorous bound, exact dyadic recomputation near midpoints); zero: +0 unless "
    "untouched; DoRA terms as a fixed-order IEEE float64 sequence; float64 outputs not certified"
)


def action_key(
    loaded: LoadedRecipe,
    target: str,
    operation: str,
    input_hashes: Mapping[str, str] | None,
    numeric_policy: str,
    extra: Mapping | None = None,
) -> str | None:
    """The target's key; None while ``input_hashes`` is unknown (a producer is not built yet)."""
    if input_hashes is None:
        return None
    payload = {
        "operation": operation,
        "target": target,
        "parameters": json.loads(target_parameters_json(loaded, target)),
        "inputs": dict(sorted(input_hashes.items())),
        "numeric_policy": numeric_policy,
        "loraforge": __version__,
        "recipe": loaded.recipe.model_dump(mode="json", include={"name", "title", "date", "seed"}),
        "recorded": recorded_fields(loaded, target),  # what the output records about the recipe
        **dict(extra or {}),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
