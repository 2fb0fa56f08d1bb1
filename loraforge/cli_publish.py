"""CLI command `loraforge publish`: build a release bundle and publish it to the Hugging Face Hub.

Builds what is not up to date exactly as `loraforge release` does (or, under
``--locked``, refuses when anything is stale or differs from the lock), checks
the bundle against its manifest and the lock, then hands it to
loraforge.publish (docs/publishing.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loraforge.errors import LoraforgeError, PlanError, UsageError

LICENSE_HINT = ("add `license:` to the recipe with the Hub's license id, e.g. license: creativeml-openrail-m (a model "
                "derived from SD 1.x), openrail++ (SDXL) or other")


def register(app: typer.Typer) -> None:
    app.command()(publish)


def publish(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    release_target: Optional[str] = typer.Argument(None, help="The release target to publish (default: the recipe's only one)."),
    to: Optional[str] = typer.Option(None, "--to", help="hf://ORG/REPO or hf://ORG/REPO@BRANCH (default: the release's publish: to:)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (refuses a public one that exists)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build, then show what would be uploaded; change nothing remote, record nothing."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="The commit message."),
    locked: bool = typer.Option(False, "--locked", help="Refuse if anything must be built or differs from <recipe>.lock."),
    offline: bool = typer.Option(False, "--offline", help="Resolve inputs from local files and the store only (the upload still needs the network)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N for the targets it builds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Build a release bundle and publish it to the Hugging Face Hub in one commit (none when already there)."""
    from loraforge.cli_common import execute_plan, stderr, stdout
    from loraforge.cli_common import fail as _fail
    from loraforge.cli_resolve import fetch_progress, resolve_options
    from loraforge.interrupts import interruptions_kept
    from loraforge.publish.bundle import read_bundle
    from loraforge.publish.run import publish_bundle
    from loraforge.recipe.loader import load_recipe
    from loraforge.resolve.lockfile import lock_path, read_lock

    try:
        loaded, name = select_release(load_recipe(recipe), release_target)
        spec = loaded.recipe.targets[name]
        destination = destination_of(loaded, name, to)
        if not loaded.recipe.license:
            raise UsageError(f"{loaded.display_name}: publishing needs a license for the model card's metadata, and "
                             f"the recipe has none; {LICENSE_HINT}. Nothing was built or uploaded.")
        with fetch_progress(stderr, enabled=not quiet) as fetching:
            build_plan = _plan_build(loaded, [name], resolve_options(offline, locked, fetching), device)
        if locked:
            _refuse_stale(loaded, build_plan)
        with interruptions_kept():
            execute_plan(build_plan, device=device, quiet=quiet, locked=locked)
        folder = Path(build_plan.target(name).output)
        lock = read_lock(lock_path(loaded.path))
        entry = lock.targets.get(name) if lock else None
        bundle = read_bundle(name, folder, (entry or {}).get("sha256"))
        with interruptions_kept():
            result = publish_bundle(
                bundle, destination, recipe_path=loaded.path, recipe_name=loaded.recipe.name,
                private=private or bool(getattr(spec, "publish", None) and spec.publish.private),
                message=message, dry_run=dry_run,
            )
    except LoraforgeError as error:
        _fail(error)
    except KeyboardInterrupt as interrupt:
        from loraforge.interrupts import exit_code_of

        stderr.print("interrupted: nothing was reported as published. A Hub commit is all files or none; run the same "
                      "command again, it makes no second commit when the files are already there.")
        raise typer.Exit(exit_code_of(interrupt))
    for line in result_lines(result):
        stdout.print(line, markup=False, soft_wrap=True, highlight=False)


def result_lines(result) -> list[str]:
    diff, where = result.changes, result.destination.url
    counts = (f"{len(diff.upload)} to upload ({diff.upload_bytes} bytes), {len(diff.unchanged)} unchanged"
              + (f", {len(diff.delete)} to delete" if diff.delete else ""))
    if result.dry_run:
        if diff.empty and result.commit:
            return [f"dry run: {where} already holds release {result.release} (commit {result.commit}); nothing would be committed."]
        lines = [f"dry run: publishing release {result.release} to {where} would commit {counts}:"]
        lines += [f"  upload {f.name} ({f.size} bytes, sha256 {f.sha256})" for f in diff.upload]
        lines += [f"  delete {name}" for name in diff.delete]
        return lines + ["Nothing was changed on the Hub and nothing was recorded."]
    if not result.committed:
        head = f"already published: {where} holds release {result.release} at commit {result.commit}; no commit made."
    else:
        made = (f"{len(diff.upload)} files uploaded ({diff.upload_bytes} bytes), {len(diff.unchanged)} unchanged"
                + (f", {len(diff.delete)} deleted" if diff.delete else ""))
        head = (f"published release {result.release} to {where}" + (" (repository created)" if result.created else "")
                + f": commit {result.commit}; {made}.")
    return [head, result.url, f"recorded in {result.lock.name} (published.{result.release})."]


def select_release(loaded, name: str | None):
    """(the recipe to build, the release target to publish); a recipe without one gets `loraforge release`'s."""
    from loraforge.cli_release import release_recipe

    releases = [n for n, t in loaded.recipe.targets.items() if t.kind == "release"]
    if name is not None:
        if name not in loaded.recipe.targets or loaded.recipe.targets[name].kind != "release":
            raise UsageError(f"{loaded.display_name} has no release target {name!r}; its release targets are: "
                             f"{', '.join(releases) or '(none)'}.")
        return loaded, name
    if len(releases) > 1:
        raise UsageError(f"{loaded.display_name} has {len(releases)} release targets ({', '.join(releases)}); name the "
                         "one to publish: loraforge publish RECIPE RELEASE_TARGET.")
    if releases:
        return loaded, releases[0]
    loaded, names = release_recipe(loaded, None)
    return loaded, names[0]


def destination_of(loaded, name: str, to: str | None):
    from loraforge.recipe.destination import DestinationSyntaxError, parse_destination

    spec = loaded.recipe.targets[name]
    raw = to if to is not None else (spec.publish.to if getattr(spec, "publish", None) else None)
    if raw is None:
        raise UsageError(f"Where should release '{name}' go? Give --to hf://ORG/REPO[@BRANCH], or add to the release "
                         "target in the recipe: publish: {to: hf://ORG/REPO}.")
    try:
        return parse_destination(raw)
    except DestinationSyntaxError as error:
        raise UsageError(f"{'--to' if to is not None else 'publish: to:'} {raw}: {error}; {error.hint}.") from None


def _plan_build(loaded, names, resolve, device):
    from loraforge.build import plan_build  # the library entry point with every registered target kind

    return plan_build(loaded, names, resolve, device=device)


def _refuse_stale(loaded, build_plan) -> None:
    from loraforge.plan.status import UP_TO_DATE

    stale = [f"{name} ({state})" for name, state in build_plan.state.items() if state != UP_TO_DATE]
    if stale:
        raise PlanError(f"--locked: {loaded.display_name} is not built as its lock records: {', '.join(stale)}. "
                        "Nothing was built or uploaded. Run `loraforge build` (and commit the lock), or publish "
                        "without --locked to build first.")
