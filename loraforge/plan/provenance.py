"""What an output records about the recipe it came from, decided at plan time.

Every output carries a title, a date and a ``loraforge.*`` provenance block
(its action key, the hashes of what it read, the slice of the recipe it
depends on). Those bytes come from the recipe, so the action key must cover
them too (``recorded_fields``): otherwise an edit that changes only them (a
`sha256:` pin added, a source path renamed, a second target added, which
suffixes the title) would leave a target "up to date" while a fresh build
writes other bytes.
"""

from __future__ import annotations

import json

from loraforge.canonical import canonical_json
from loraforge.formats.metadata import provenance_json, release_date
from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.secrets import redact_url


def output_title(loaded: LoadedRecipe, name: str) -> str:
    """The recipe's title (or name); suffixed with the target's name when the recipe has several."""
    recipe = loaded.recipe
    title = recipe.title or recipe.name
    # Releases write no model file, so they do not count: adding one (or `loraforge release`
    # adding its own) must not change the title, and so the bytes, of a recipe's only output.
    if name != recipe.name and sum(1 for t in recipe.targets.values() if t.produces != "bundle") > 1:
        title = f"{title} ({name})"
    return title


def recorded_fields(loaded: LoadedRecipe, name: str) -> dict:
    """Everything recipe-derived that target ``name``'s output records (for its action key)."""
    return {
        "title": output_title(loaded, name),
        "date": release_date(loaded.recipe.date),  # the recipe's date, else SOURCE_DATE_EPOCH's
        "recipe_slice": recipe_slice_json(loaded, name),
    }


def provenance_fields(plan, target) -> dict[str, str]:
    """The ``loraforge.*`` metadata of a built output (formats/metadata.py adds the prefix)."""
    return {
        "action_key": target.action_key,
        "inputs": provenance_json(target.read_hashes),  # inputs, and outputs of targets it reads
        "recipe": recipe_slice_json(plan.loaded, target.name),
        "target": target.name,
    }


def recipe_slice_json(loaded: LoadedRecipe, name: str) -> str:
    """The part of the recipe this target depends on (itself, its inputs, the targets it reads).

    Only that part, so that editing an unrelated target does not change this output's bytes.
    """
    recipe = loaded.recipe
    names, stack = set(), [name]
    while stack:
        current = stack.pop()
        if current not in names:
            names.add(current)
            if current in recipe.targets:
                stack.extend(recipe.dependencies(current))
    header = recipe.model_dump(mode="json", include={"loraforge", "name", "title", "date", "seed"})
    return provenance_json(
        {
            **header,
            "inputs": {n: _input_json(recipe.inputs[n]) for n in sorted(names) if n in recipe.inputs},
            "targets": {
                n: json.loads(target_parameters_json(loaded, n)) for n in sorted(names) if n in recipe.targets
            },
        }
    )


def _input_json(spec) -> dict:
    """An input's fields; ``allow_pickle`` only when set, so outputs of recipes without it keep their bytes."""
    data = spec.model_dump(mode="json")
    data["source"] = redact_url(data["source"])  # never a credential in an output (resolve/secrets.py)
    if not data.get("allow_pickle"):
        data.pop("allow_pickle", None)
    return data


def target_parameters_json(loaded: LoadedRecipe, target: str) -> str:
    """The target's recipe entry with defaults and its effective precision, canonical JSON."""
    recipe = loaded.recipe
    spec = recipe.targets[target].model_dump(mode="json")
    precision = recipe.effective_precision(target)
    if precision is not None:
        spec["precision"] = precision.model_dump(mode="json")
    spec.pop("device", None)  # the device class, where it matters, comes through `extra`
    spec.pop("output", None)  # where the file goes does not change its bytes
    return canonical_json(spec)
