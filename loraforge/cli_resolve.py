"""CLI commands of the resolver: `fetch`, `lock`, `cache ls|path|verify|gc`, and the
`build --offline/--locked` glue. Registered on the main app by :func:`register`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from loraforge.errors import LoraforgeError

cache_app = typer.Typer(help="Inspect and clean the content-addressed download store.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command()(fetch)
    app.command()(lock)
    app.add_typer(cache_app, name="cache")


# --- progress -------------------------------------------------------------------


class RichFetchProgress:
    """Per-file and total bars (bytes, rate, ETA); shown only once something downloads."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console, self.enabled = console, enabled
        self._progress: Progress | None = None
        self._tasks: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._total_task = None

    def start(self, name: str, total: int | None, done: int = 0) -> None:
        if not self.enabled:
            return
        progress = self._ensure_started()
        if name not in self._tasks:
            self._tasks[name] = progress.add_task(name, total=total, completed=done)
        else:
            progress.update(self._tasks[name], total=total, completed=done)
        if total is not None:
            self._totals[name] = total
        self._done[name] = done
        self._refresh_total()

    def advance(self, name: str, nbytes: int) -> None:
        if self._progress is None or name not in self._tasks:
            return
        self._progress.advance(self._tasks[name], nbytes)
        self._done[name] = self._done.get(name, 0) + nbytes
        self._refresh_total()

    def finish(self, name: str) -> None:
        pass

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _ensure_started(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
        return self._progress

    def _refresh_total(self) -> None:
        if len(self._tasks) < 2:
            return
        total = sum(self._totals.values()) or None
        done = sum(self._done.values())
        if self._total_task is None:
            self._total_task = self._progress.add_task("total", total=total, completed=done)
        else:
            self._progress.update(self._total_task, total=total, completed=done)


@contextmanager
def fetch_progress(console: Console, enabled: bool = True):
    progress = RichFetchProgress(console, enabled)
    try:
        yield progress
    finally:
        progress.close()


# --- build glue -----------------------------------------------------------------


def resolve_options(offline: bool, locked: bool, progress):
    from loraforge.resolve.resolver import ResolveOptions

    return ResolveOptions(offline=offline, locked=locked, progress=progress)


# --- commands -------------------------------------------------------------------


def _consoles():
    from loraforge.cli_common import fail as _fail
    from loraforge.cli_common import stderr, stdout

    return stdout, stderr, _fail


def fetch(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    inputs: Optional[List[str]] = typer.Argument(None, help="Inputs to fetch (default: all of the recipe's)."),
    locked: bool = typer.Option(False, "--locked", help="Fetch exactly what <recipe>.lock pins; refuse any difference."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Download every input of the recipe into the store (verified by sha256), with progress."""
    from loraforge.recipe.loader import load_recipe
    from loraforge.resolve.resolver import ResolveOptions, resolve_inputs
    from loraforge.targets.registry import TARGET_KINDS

    stdout, stderr, fail = _consoles()
    try:
        loaded = load_recipe(recipe)
        names = _input_names(loaded, inputs or [])
        with fetch_progress(stderr, enabled=not quiet) as progress:
            options = ResolveOptions(locked=locked, progress=progress, numeric_policies=TARGET_KINDS.numeric_policies())
            resolved = resolve_inputs(loaded, names, options)
    except LoraforgeError as error:
        fail(error)
    except KeyboardInterrupt as interrupt:
        from loraforge.cli_common import interrupted

        interrupted(interrupt, "interrupted: partial downloads are kept and resume on the next run.")
    rows = [
        {"input": n, "status": r.origin, "size": r.size, "sha256": r.sha256, "path": str(r.path)}
        for n, r in sorted(resolved.items())
    ]
    if as_json:
        typer.echo(json.dumps({"inputs": rows}, indent=2))
        return
    table = Table("input", "status", "size", "sha256", "path", box=None)
    for row in rows:
        table.add_row(row["input"], row["status"], _size(row["size"]), row["sha256"][:16] + "…", row["path"])
    stdout.print(table)


def lock(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Resolve every input now and write <recipe>.lock (downloading only what a source cannot describe)."""
    from loraforge.recipe.loader import load_recipe
    from loraforge.resolve.lock_sync import updated_lock
    from loraforge.targets.registry import TARGET_KINDS
    from loraforge.resolve.lockfile import lock_path, read_lock, write_lock
    from loraforge.resolve.resolver import ResolveOptions, resolve_inputs

    stdout, stderr, fail = _consoles()
    try:
        loaded = load_recipe(recipe)
        path = lock_path(loaded.path)
        previous = read_lock(path)
        with fetch_progress(stderr, enabled=not quiet) as progress:
            options = ResolveOptions(refresh=True, download=False, progress=progress)
            resolved = resolve_inputs(loaded, list(loaded.recipe.inputs), options)
        changed = write_lock(path, updated_lock(loaded, resolved, None, previous, numeric_policy=TARGET_KINDS.numeric_policies()))
    except LoraforgeError as error:
        fail(error)
    except KeyboardInterrupt as interrupt:
        from loraforge.cli_common import interrupted

        interrupted(interrupt, f"interrupted: {lock_path(Path(recipe))} is unchanged; partial downloads are kept and resume on the next run.")
    stdout.print(f"{'wrote' if changed else 'unchanged'} {path} ({len(resolved)} inputs)")


def _input_names(loaded, names: list[str]) -> list[str]:
    from loraforge.errors import ResolveError

    unknown = [n for n in names if n not in loaded.recipe.inputs]
    if unknown:
        raise ResolveError(
            f"{loaded.display_name}: no input named {', '.join(repr(n) for n in unknown)}; "
            f"inputs of this recipe: {', '.join(sorted(loaded.recipe.inputs)) or '(none)'}."
        )
    return names or list(loaded.recipe.inputs)


@cache_app.command("ls")
def cache_ls(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the blobs in the store: sha256, size and the sources they were fetched for."""
    from loraforge.resolve.cache_admin import list_blobs
    from loraforge.resolve.store import Store

    stdout, _, _ = _consoles()
    store = Store()
    blobs = list_blobs(store)
    if as_json:
        rows = [{"sha256": b.sha256, "size": b.size, "path": str(b.path), "sources": list(b.sources)} for b in blobs]
        typer.echo(json.dumps({"store": str(store.root), "blobs": rows}, indent=2))
        return
    table = Table("sha256", "size", "sources", box=None)
    for blob in blobs:
        table.add_row(blob.sha256, _size(blob.size), ", ".join(blob.sources) or "-")
    stdout.print(table)
    stdout.print(f"{len(blobs)} blobs, {_size(sum(b.size for b in blobs))} in {store.root}")


@cache_app.command("path")
def cache_path(sha256: Optional[str] = typer.Argument(None, help="A blob's sha256 (or a prefix of 6+ digits).")) -> None:
    """Print the store's folder, or the file of one blob."""
    from loraforge.resolve.cache_admin import find_blob
    from loraforge.resolve.store import Store

    _, _, fail = _consoles()
    store = Store()
    try:
        typer.echo(str(find_blob(store, sha256) if sha256 else store.root))
    except LoraforgeError as error:
        fail(error)


@cache_app.command("verify")
def cache_verify() -> None:
    """Re-hash every blob; damaged ones are removed (they are fetched again when needed). Exit 1 if any."""
    from loraforge.resolve.cache_admin import verify_blobs
    from loraforge.resolve.store import Store

    stdout, _, _ = _consoles()
    # Plain echo, not rich: hashes must not be wrapped (scripts grep them).
    damaged = verify_blobs(Store(), lambda info, ok: typer.echo(f"{'ok     ' if ok else 'DAMAGED'} {info.sha256}"))
    for info in damaged:
        typer.echo(f"removed damaged blob {info.sha256} ({', '.join(info.sources) or 'no known source'})")
    if damaged:
        raise typer.Exit(1)


@cache_app.command("gc")
def cache_gc(
    folders: Optional[List[Path]] = typer.Argument(None, help="Folders searched for .lock files (blobs none refers to are removed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    all_: bool = typer.Option(False, "--all", help="With no FOLDER: remove every blob no lock under the current folder refers to, without asking."),
) -> None:
    """Remove blobs that no loraforge lock file under the given folders refers to, and leftovers of killed runs.

    With no FOLDER the scope is the current folder: gc lists what it would remove and asks (or needs --all).
    """
    from loraforge.atomic import _tree_size
    from loraforge.resolve.cache_admin import collect_garbage, list_blobs, referenced_hashes, remove_stale_files, stale_files
    from loraforge.resolve.store import Store
    from loraforge.resolve.store_use import store_alone
    from loraforge.scratch import remove_stale_scratch, stale_scratch_folders

    _, _, fail = _consoles()
    store = Store()
    scope = folders or [Path(".")]
    try:
        confirmed = None
        if not folders and not all_ and not dry_run:
            confirmed = _confirm_unscoped(store, scope)
            if confirmed is None:
                typer.echo("nothing removed")
                return
        with store_alone(store.root):  # refuses while a build uses the store
            keep, locks = referenced_hashes(scope)
            if confirmed is not None:  # only what the user said yes to, and still unreferenced
                keep |= {info.sha256 for info in list_blobs(store)} - confirmed
            doomed = collect_garbage(store, keep, dry_run)
            if dry_run:
                freed = [(path, _tree_size(path)) for path in stale_files(store) + stale_scratch_folders()]
            else:
                freed = remove_stale_files(store) + remove_stale_scratch()
    except LoraforgeError as error:
        fail(error)
    verb = "would remove" if dry_run else "removed"
    for info in doomed:
        typer.echo(f"{verb} {info.sha256} {_size(info.size)} {', '.join(info.sources)}")
    for path, size in freed:
        typer.echo(f"{verb} {path} {_size(size)} (left by a killed run)")
    typer.echo(
        f"{verb} {len(doomed)} blobs ({_size(sum(i.size for i in doomed))}); "
        f"kept what {len(locks)} lock files refer to"
        + (f"; {verb} {len(freed)} leftovers of killed runs ({_size(sum(size for _, size in freed))})" if freed else "")
    )


def _confirm_unscoped(store, scope) -> set[str] | None:
    """gc with no folder: list what it would remove and ask; the sha256s the user agreed to, None for no.
    Without a terminal to ask on, refuse (UsageError) with how to give a scope or --all."""
    from loraforge.errors import UsageError
    from loraforge.resolve.cache_admin import collect_garbage, referenced_hashes

    keep, locks = referenced_hashes(scope)
    doomed = collect_garbage(store, keep, dry_run=True)
    total = _size(sum(i.size for i in doomed))
    here = Path(".").resolve()
    if not doomed:
        return set()
    if not _interactive():
        raise UsageError(
            f"cache gc with no folder would remove {len(doomed)} blobs ({total}) that no lock file under the current "
            f"folder {here} refers to, which includes the downloads of every recipe kept elsewhere; nothing was "
            "removed. Name the folders that hold your recipes (`loraforge cache gc ~/recipes`), look first with "
            "--dry-run, or pass --all to remove them without asking."
        )
    for info in doomed:
        typer.echo(f"would remove {info.sha256} {_size(info.size)} {', '.join(info.sources)}")
    question = f"Remove these {len(doomed)} blobs ({total}), which none of the {len(locks)} lock files under {here} refers to?"
    return {info.sha256 for info in doomed} if typer.confirm(question, default=False) else None


def _interactive() -> bool:
    import sys

    return sys.stdin.isatty()


def _size(size: int | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)
