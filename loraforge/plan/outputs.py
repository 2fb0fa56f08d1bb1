"""Where a target may write: inside the recipe's folder, never over an input.

Recipes are shared and cloned like code, so a recipe must not be able to make
a build replace a file elsewhere on the machine (``output: ../../models/
sd15.safetensors``, an absolute path, or a ``dist`` symlink committed to git
pointing into the user's model folder). The rule (docs/security.md): the
output path, with every symlink resolved, lies inside the recipe's folder,
also with symlinks resolved. To write elsewhere, keep the recipe there, or
copy the built file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from loraforge.recipe.loader import LoadedRecipe


def checked_output_path(loaded: LoadedRecipe, target: str) -> Path:
    """The target's output, resolved; RecipeError (at its `output:` line) when it leaves the recipe folder."""
    written = loaded.recipe.default_output(target)
    field = ("targets", target, "output") if loaded.recipe.targets[target].output else ("targets", target)
    hint = (
        "write a path relative to the recipe's folder without '..', e.g. dist/<name>.safetensors; to put the "
        "file elsewhere, keep the recipe in that folder or copy the output after the build"
    )
    if PurePosixPath(written).is_absolute() or PureWindowsPath(written).is_absolute() or written.startswith("~"):
        raise loaded.error(field, f"the output {written!r} is an absolute path; outputs must stay inside the recipe's folder", hint)
    if os.path.normpath(written).split(os.sep)[0] == os.pardir:
        raise loaded.error(field, f"the output {written!r} leads out of the recipe's folder with '..'", hint)
    root = loaded.root.resolve()
    output = (root / written).resolve()
    if not output.is_relative_to(root):
        raise loaded.error(
            field,
            f"the output {written!r} resolves to {output}, outside the recipe's folder {root}, through a symbolic link",
            hint + "; a symlinked output folder is refused because a shared recipe could use one to overwrite files",
        )
    return output


RECIPE_SUFFIXES = (".yaml", ".yml")


def other_recipe_writer(loaded: LoadedRecipe, output: Path) -> str | None:
    """Which other recipe wrote ``output`` (a file, or a bundle folder), as 'b.yaml', or None.

    Two recipes in one folder can name the same output (both ``dist/x.safetensors``), and each build would
    silently replace the other's file and leave the other's lock describing bytes it no longer matches.
    Another recipe counts as the writer when its lock (``<recipe>.lock`` next to a ``<recipe>.yaml`` or
    ``.yml`` in this folder) records the output, or when the bundle's manifest.json names another recipe file.
    Only an output that exists counts; damaged sibling locks are left to their own recipe to report.
    """
    from loraforge.errors import LoraforgeError
    from loraforge.resolve.lockfile import lock_path, read_lock

    if not output.exists():
        return None
    root = loaded.root
    own = loaded.path.resolve()
    manifest = output / "manifest.json" if output.is_dir() else None
    if manifest is not None and manifest.is_file() and not manifest.is_symlink():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))["recipe"]["file"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        if isinstance(recorded, str) and recorded != loaded.path.name and (root / recorded).resolve() != own:
            return recorded
    written = output.resolve()
    for recipe in sorted(p for p in root.iterdir() if p.suffix in RECIPE_SUFFIXES and p.is_file()):
        if recipe.resolve() == own or lock_path(recipe) == lock_path(loaded.path):
            continue
        try:
            lock = read_lock(lock_path(recipe))
        except LoraforgeError:
            continue
        for entry in (lock.targets.values() if lock else ()):
            recorded = entry.get("output") if isinstance(entry, dict) else None
            if isinstance(recorded, str) and written in (resolved := (root / recorded).resolve(), resolved.parent):
                return recipe.name
    return None
