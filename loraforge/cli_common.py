"""What every CLI command module shares: the consoles, the error exit and the build with progress bars.

A leaf of the CLI: ``cli.py`` and the ``cli_*.py`` command modules import it,
it imports none of them (so the command modules do not import ``cli.py``).
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from loraforge.errors import LoraforgeError

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def fail(error: LoraforgeError) -> None:
    # escaped: a message quotes file names and values, whose brackets rich would read as markup
    stderr.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, soft_wrap=True)
    raise typer.Exit(error.exit_code)


def interrupted(interrupt: KeyboardInterrupt, message: str) -> None:
    """Ctrl-C or SIGTERM: one line on stderr, exit 130 or 143 (loraforge/interrupts.py)."""
    from loraforge.interrupts import exit_code_of

    stderr.print(message, soft_wrap=True)
    raise typer.Exit(exit_code_of(interrupt))


def execute_plan(build_plan, *, device=None, quiet=False, locked=False, force=(), jobs=1, memory_budget=None, executor=None):
    """Run a plan the way `build` does: progress bars, the lock updated after each target (never
    under --locked, which checks every target against it instead). Shared by `build` and `release`.
    ``executor``: None for this machine (``jobs``, ``memory_budget``), or e.g. a RayExecutor."""
    from loraforge.execute.driver import drive_build
    from loraforge.render import BuildProgress

    bars = BuildProgress(stderr, enabled=not quiet)
    return drive_build(
        build_plan, device=device, progress=bars.for_target, display=bars,
        lock="check" if locked else "record", force=force, jobs=jobs, memory_budget=memory_budget, executor=executor,
    )
