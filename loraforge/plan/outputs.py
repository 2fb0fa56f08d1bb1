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
