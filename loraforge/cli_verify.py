"""`loraforge verify`: rebuild in a temporary folder and compare with the lock. Registered by :func:`register`.

Exit status: 0 when everything reproduces, 1 when something does not (a
finding, printed), 2 for an error the user must fix first (no lock, a
missing input, a bad recipe).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from loraforge.errors import LoraforgeError

MODULES_SHOWN = 20  # per target in the human output; --json lists them all


def register(app: typer.Typer) -> None:
    app.command()(verify)


def verify(
    recipe: Path = typer.Argument(..., help="The recipe YAML file (its .lock must be next to it)."),
    targets: Optional[List[str]] = typer.Argument(None, help="Targets to verify, with what they need (default: all)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides the recipe)."),
    offline: bool = typer.Option(False, "--offline", help="Use only local files and the download store; never the network."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; print only what does not reproduce."),
    remote: Optional[str] = typer.Option(None, "--remote", help="hf://ORG/REPO@COMMIT: check that a published release is the one the lock records (name the release if the recipe has several)."),
) -> None:
    """Rebuild every target into a temporary folder and check it against <recipe>.lock and the outputs on disk."""
    if remote is not None:
        _verify_remote(recipe, targets or [], remote, as_json)
    from loraforge.cli_common import fail as _fail
    from loraforge.cli_common import stderr
    from loraforge.cli_resolve import fetch_progress
    from loraforge.interrupts import interruptions_kept
    from loraforge.render import BuildProgress
    from loraforge.verify.run import verify_recipe

    try:
        with interruptions_kept(), fetch_progress(stderr, enabled=not quiet) as fetching, BuildProgress(stderr, enabled=not quiet) as building:
            report = verify_recipe(recipe, targets or [], device=device, offline=offline,
                                   fetch_progress=fetching, build_progress=building.for_target)
    except LoraforgeError as error:
        _fail(error)
    except KeyboardInterrupt as interrupt:
        from loraforge.interrupts import exit_code_of

        stderr.print("interrupted: the temporary rebuild was removed; nothing else was written.")
        raise typer.Exit(exit_code_of(interrupt))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report_lines(report, quiet):
            typer.echo(line)
    raise typer.Exit(0 if report.ok else 1)


def _verify_remote(recipe: Path, targets: list[str], remote: str, as_json: bool) -> None:
    """--remote: download the published manifest and files and compare them with the lock (verify/remote.py)."""
    from loraforge.cli_common import fail as _fail
    from loraforge.verify.remote import verify_remote

    if len(targets) > 1:
        _fail(LoraforgeError(f"--remote checks one release at a time; {len(targets)} targets were named ({', '.join(targets)})."))
    try:
        report = verify_remote(recipe, remote, targets[0] if targets else None)
    except LoraforgeError as error:
        _fail(error)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            typer.echo(line)
    raise typer.Exit(0 if report.ok else 1)


def report_lines(report, quiet: bool = False) -> list[str]:
    """The human report: drift, one line per target with its reason, the modules that differ, a summary."""
    lines = [f"note: {note}" for note in report.notes]
    for drift in report.drift:
        lines.append(
            f"INPUT CHANGED {drift.name}: sha256 {drift.current_sha256[:12]}… but the lock has "
            f"{drift.locked_sha256[:12]}…; read by {', '.join(drift.readers) or '(no selected target)'}"
        )
    for verdict in report.targets:
        if quiet and verdict.ok:
            continue
        lines.extend(_target_lines(verdict))
    counts: dict[str, int] = {}
    for verdict in report.targets:
        counts[verdict.status] = counts.get(verdict.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    verdict_word = "OK" if report.ok else "FAILED"
    lines.append(f"{verdict_word}: {_count(len(report.targets), 'target')} verified against {report.lock.name} "
                 f"({summary or 'none'})" + (f"; {_count(len(report.drift), 'input')} changed" if report.drift else ""))
    return lines


def _target_lines(verdict) -> list[str]:
    head = f"{verdict.status.upper() if not verdict.ok else verdict.status:<17} {verdict.name}  [{verdict.operation}, {verdict.rule}]"
    lines = [head] + [f"    {reason}" for reason in verdict.reasons]
    difference = verdict.difference
    if difference is None or verdict.ok and verdict.status != "within tolerance":
        return lines
    if difference.metadata:
        lines.append(f"    metadata keys that differ: {', '.join(difference.metadata)}")
    modules = difference.modules
    if verdict.tolerance is not None:
        worst = max((m.relative_error for m in modules), default=0.0)
        lines.append(f"    largest module error {_number(worst)} (tolerance {verdict.tolerance:.3g})")
        modules = difference.out_of_tolerance(verdict.tolerance)
    for module in modules[:MODULES_SHOWN]:
        lines.append(f"    module {module.module}: relative error {_number(module.relative_error)} "
                     f"({', '.join(module.tensors)})")
    if len(modules) > MODULES_SHOWN:
        lines.append(f"    … and {len(modules) - MODULES_SHOWN} more modules (--json lists them all)")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _number(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3g}"
