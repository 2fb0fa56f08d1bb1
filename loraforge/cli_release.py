"""CLI command `loraforge release`: build the recipe's release bundles (docs/releases.md).

It plans and runs like `build` (the same execute_plan: incremental, lock
written as targets finish), selecting the recipe's `kind: release` targets
and, through them, everything they bundle. A recipe without one gets a
release target named `release` for this command only, bundling every target
into ``--output`` (default dist/release).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import typer

from loraforge.errors import LoraforgeError, UsageError

DEFAULT_NAME = "release"
DEFAULT_FOLDER = "dist/release"


def register(app: typer.Typer) -> None:
    app.command()(release)


def release(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    output: Optional[Path] = typer.Option(None, "--output", help="The bundle folder, inside the recipe's folder (default: the release target's output:, or dist/release)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N for the targets it builds (overrides the recipe)."),
    offline: bool = typer.Option(False, "--offline", help="Use only local files and the download store; never the network."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Build what the release needs, then the bundle folder: outputs, manifest.json, README.md, recipe and lock."""
    from loraforge.cli_common import execute_plan, stderr, stdout
    from loraforge.cli_common import fail as _fail
    from loraforge.cli_resolve import fetch_progress, resolve_options
    from loraforge.interrupts import interruptions_kept
    from loraforge.build import plan_build
    from loraforge.recipe.loader import load_recipe
    from loraforge.render import render_build_result

    try:
        loaded, names = release_recipe(load_recipe(recipe), output)
        with fetch_progress(stderr, enabled=not quiet) as fetching:
            build_plan = plan_build(loaded, names, resolve_options(offline, False, fetching), device=device)
        with interruptions_kept():
            summary = execute_plan(build_plan, device=device, quiet=quiet)
    except LoraforgeError as error:
        _fail(error)
    except KeyboardInterrupt as interrupt:
        from loraforge.interrupts import exit_code_of

        stderr.print("interrupted: the previous bundle (if any) is unchanged; targets that finished are kept and in the lock.")
        raise typer.Exit(exit_code_of(interrupt))
    render_build_result(stdout, summary)
    for name in names:
        stdout.print(f"release {name}: {build_plan.target(name).output}", markup=False, soft_wrap=True)


def release_recipe(loaded, output: Path | None):
    """(the recipe to build, the release targets to select), applying ``--output``.

    Recipes are frozen, so the recipe built here is a copy: with its one
    release target's output replaced, or with a `release` target added.
    """
    recipe = loaded.recipe
    names = [name for name, target in recipe.targets.items() if target.kind == "release"]
    folder = _recipe_relative(loaded, output) if output is not None else None
    if names:
        if folder is None:
            return loaded, names
        if len(names) > 1:
            raise UsageError(f"{loaded.display_name} has {len(names)} release targets ({', '.join(names)}), so --output "
                             "cannot say which one it moves; set each one's `output:` in the recipe instead.")
        targets = {**recipe.targets, names[0]: recipe.targets[names[0]].model_copy(update={"output": folder})}
    else:
        from loraforge.recipe.schema import ReleaseSpec

        name = _free_name(recipe)
        names = [name]
        targets = {**recipe.targets, name: ReleaseSpec(kind="release", output=folder or DEFAULT_FOLDER)}
    return dataclasses.replace(loaded, recipe=recipe.model_copy(update={"targets": targets})), names


def _free_name(recipe) -> str:
    """`release`, or `release-2`, ... when the recipe already uses that name."""
    taken = set(recipe.inputs) | set(recipe.targets)
    name, number = DEFAULT_NAME, 1
    while name in taken:
        number += 1
        name = f"{DEFAULT_NAME}-{number}"
    return name


def _recipe_relative(loaded, output: Path) -> str:
    """--output (relative to the current folder, as the shell gives it) as a path relative to the recipe."""
    folder = Path(os.path.abspath(Path(output).expanduser()))
    root = loaded.root.resolve()
    try:
        relative = folder.resolve().relative_to(root)
    except ValueError:
        raise UsageError(
            f"--output {output} is outside the recipe's folder {root}. Like every output, a release bundle is "
            "written inside the recipe's folder (docs/security.md); build it there and copy or move the folder afterwards."
        ) from None
    if relative == Path("."):
        raise UsageError(f"--output {output} is the recipe's own folder; give a folder of its own, e.g. {DEFAULT_FOLDER}.")
    return relative.as_posix()
