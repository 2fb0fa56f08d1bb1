"""CLI command `loraforge new`: write a commented starter recipe, then say what to run next.

Registered on the main app by :func:`register`. The starters themselves are in
:mod:`loraforge.recipe.starters`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from loraforge.errors import LoraforgeError


def register(app: typer.Typer) -> None:
    app.command()(new)


def new(
    path: Optional[Path] = typer.Argument(None, help="Recipe file to write (default: recipe.yaml here; a folder gets recipe.yaml inside)."),
    arch: str = typer.Option("sd1", "--arch", help="Base model architecture: sd1 (SD 1.5), sd2 (SD 2.1), sdxl (SDXL 1.0) or flux (Flux.1 dev; bake starter only)."),
    example: str = typer.Option("bake", "--example", help="Which starter: bake (LoRAs baked into a checkpoint, a merged LoRA, a release bundle) or merge (checkpoints merged: weighted sum and TIES, a LoRA on top)."),
    force: bool = typer.Option(False, "--force", help="Replace the file if it exists."),
) -> None:
    """Write a commented starter recipe; edit the lines marked CHANGE ME, then plan and build it."""
    from loraforge.cli_common import fail as _fail
    from loraforge.cli_common import stdout
    from loraforge.recipe.starters import write_starter

    try:
        written, chosen = write_starter(path, arch, force, example)
    except LoraforgeError as error:
        _fail(error)
    what = "a checkpoint-merge starter recipe" if chosen.example == "merge" else "a starter recipe"
    stdout.print(f"Wrote {written}: {what} for {chosen.label}.", markup=False, soft_wrap=True)
    stdout.print(next_steps(written), markup=False, soft_wrap=True)


def next_steps(recipe: Path) -> str:
    """What to do with a fresh starter, as commands to copy (paths shell-quoted)."""
    shown = shlex.quote(str(recipe))
    lock = shlex.quote(str(recipe.with_suffix(".lock")))
    steps = [
        ("1.", "edit the values marked CHANGE ME (inputs, strengths, names)", None),
        ("2.", "check inputs, key matching and block weights", f"loraforge plan {shown}"),
        ("3.", "download, build into dist/ and write the lock file", f"loraforge build {shown}"),
        ("4.", "later: move @main sources to their newest files", f"loraforge lock {shown}"),
        ("5.", "keep the recipe and its lock together", f"git add {shown} {lock} && git commit"),
    ]
    lines = ["Next steps:"]
    for number, why, command in steps:
        lines.append(f"  {number} {why}" + (f":\n       {command}" if command else ""))
    lines.append("Anyone can then rebuild the same bytes with `loraforge build --locked` (docs/reproducibility.md).")
    return "\n".join(lines)
