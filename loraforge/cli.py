"""The `loraforge` command line.

Each command is a thin layer: parse arguments, call the library, render the
result. Errors a user can fix (loraforge.errors) are printed as one paragraph
without a traceback and exit with status 2.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import List, Optional

import typer

from loraforge import __version__
from loraforge.cli_common import execute_plan, interrupted, stderr, stdout
from loraforge.cli_common import fail as _fail
from loraforge.errors import LoraforgeError
from loraforge.interrupts import interruptions_kept

class _Loraforge(typer.Typer):
    """The app, with running out of memory (a low ``ulimit -v``, a container's limit) as one paragraph, not a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except (MemoryError, ImportError, OSError) as error:
            if not isinstance(error, MemoryError) and "failed to map segment" not in str(error):
                raise
            # os.write, not the rich console: printing must not need memory or a module not loaded yet
            os.write(2, (out_of_memory_message() + "\n").encode())
            raise SystemExit(2) from None


def out_of_memory_message() -> str:
    """What a user reads when the process could not get memory (also while loading a library)."""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    limit = "no limit on address space" if soft == resource.RLIM_INFINITY else f"an address-space limit (ulimit -v) of {soft >> 20} MiB"
    return (
        f"error: loraforge ran out of memory (the system refused an allocation; this process has {limit}); nothing "
        "half-written is kept, and the next run removes any temporary file left. Fix: raise the limit (ulimit -v "
        "unlimited, or a larger container memory limit), or free memory; a bake needs about the largest tensor of the "
        "base plus its LoRA factors, and torch alone maps several hundred MiB of address space."
    )


app = _Loraforge(
    name="loraforge",
    help="Declarative, reproducible builds of Stable Diffusion model releases.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"loraforge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Declarative, reproducible builds of Stable Diffusion model releases."""
    from loraforge.interrupts import install_terminate_handler

    install_terminate_handler()  # SIGTERM unwinds like Ctrl-C: no temp file is left behind
    if ctx.invoked_subcommand != "cache":  # `cache gc` reports (and removes) leftovers itself, and needs the store alone
        from loraforge.resolve.store import store_root
        from loraforge.resolve.store_use import store_in_use

        _tidy()
        if ctx.invoked_subcommand not in ("inspect", "new"):
            ctx.with_resource(store_in_use(store_root()))  # shared until the command ends: gc waits its turn


def _tidy() -> None:
    """Remove what killed runs left in known places (two folder listings): the store's tmp/ and verify's scratch."""
    from loraforge.resolve.cache_admin import remove_stale_files
    from loraforge.resolve.store import Store
    from loraforge.scratch import remove_stale_scratch

    try:
        remove_stale_files(Store())
        remove_stale_scratch()
    except OSError:
        pass  # tidying is a courtesy: never a reason for a command to fail


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="A .safetensors checkpoint or adapter."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Identify a .safetensors file: architecture, adapter kind, ranks, blocks, metadata, hashes."""
    from loraforge.inspect import inspect_file
    from loraforge.render import render_inspect

    try:
        report = inspect_file(file)
    except LoraforgeError as error:
        _fail(error)
    if as_json:
        _print_json(report)
    else:
        render_inspect(stdout, report)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    targets: Optional[List[str]] = typer.Argument(None, help="Targets to plan (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a tree."),
) -> None:
    """Show what a build would do: inputs, targets, key matching, bytes, up-to-date status."""
    from loraforge.plan.report import plan_report
    from loraforge.render import render_plan
    from loraforge.targets.registry import TARGET_KINDS

    try:
        report = plan_report(_plan(recipe, targets or []))
    except LoraforgeError as error:
        _fail(error)
    except KeyboardInterrupt as interrupt:
        interrupted(interrupt, "interrupted: nothing was written; partial downloads are kept and resume on the next run.")
    if as_json:
        _print_json(report)
    else:
        render_plan(stdout, report, TARGET_KINDS)


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    targets: Optional[List[str]] = typer.Argument(None, help="Targets to build, with what they need (default: all)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides the recipe)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    offline: bool = typer.Option(False, "--offline", help="Use only local files and the download store; never the network."),
    locked: bool = typer.Option(False, "--locked", help="Refuse to build if anything differs from <recipe>.lock (which stays unchanged)."),
    force: bool = typer.Option(False, "--force", help="Rebuild the named targets (all when none are named) even if up to date."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Build up to N independent targets at once."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Memory the concurrent targets may use, e.g. 12G (default: half the RAM)."),
    executor: str = typer.Option("local", "--executor", help="local (this process) | ray (each target a Ray task; needs the ray extra, docs/scaling.md)."),
    address: Optional[str] = typer.Option(None, "--address", help="With --executor ray: the Ray cluster (HEAD:6379, or auto); default: a Ray instance on this machine."),
    store: Optional[str] = typer.Option(None, "--store", help="With --executor ray: fsspec URL of a store every worker reaches (file://, s3://, gs://); default $LORAFORGE_STORE, else the shared filesystem."),
) -> None:
    """Build what is not up to date; outputs are written atomically with provenance metadata."""
    from loraforge.cli_resolve import fetch_progress, resolve_options
    from loraforge.render import render_build_result

    try:
        if memory_budget is not None:
            from loraforge.execute.jobs import parse_memory_size

            parse_memory_size(memory_budget)  # a bad size is refused before anything is fetched or planned
        runner = _executor(executor, address, store, device=device, quiet=quiet, jobs=jobs, memory_budget=memory_budget)
        with fetch_progress(stderr, enabled=not quiet) as fetching:
            build_plan = _plan(recipe, targets or [], resolve_options(offline, locked, fetching), device=device)
        forced = [t.name for t in build_plan.targets if not targets or t.name in targets] if force else []
        with interruptions_kept():
            summary = execute_plan(build_plan, device=device, quiet=quiet, locked=locked, force=forced, jobs=jobs, memory_budget=memory_budget, executor=runner)
    except LoraforgeError as error:
        _fail(error)
    except KeyboardInterrupt as interrupt:
        from loraforge.interrupts import exit_code_of

        stderr.print("interrupted: no partial output was left behind. Targets that finished are kept and in the lock.")
        raise typer.Exit(exit_code_of(interrupt))
    render_build_result(stdout, summary)


def _executor(name: str, address: str | None, store: str | None, *, device, quiet: bool, jobs: int, memory_budget):
    """None for the local executor (execute_plan makes it from --jobs); the RayExecutor for ``ray``, checked
    (Ray installed, options that apply) before anything is fetched or planned. A local build never imports ray."""
    from loraforge.errors import UsageError

    if name not in ("local", "ray"):
        raise UsageError(f"--executor {name!r} is not an executor: use local (the default) or ray.")
    if name == "local":
        if address is not None or store is not None:
            given = " and ".join(option for option, value in (("--address", address), ("--store", store)) if value is not None)
            verb = "apply" if address is not None and store is not None else "applies"
            raise UsageError(f"{given} only {verb} to --executor ray; add --executor ray, or leave it out for a local build.")
        return None
    if jobs != 1 or memory_budget is not None:
        raise UsageError("--jobs and --memory-budget are for the local executor; with --executor ray, Ray runs as many targets "
                         "at once as the cluster's CPUs and memory allow (each target asks for its memory estimate).")
    from loraforge.execute.ray_executor import RayExecutor, import_ray
    from loraforge.execute.remote_store import store_url

    import_ray()
    log = None if quiet else (lambda line: stderr.print(line, markup=False, highlight=False, soft_wrap=True))
    return RayExecutor(address=address, device=device, store=store_url(store), log=log)


def _print_json(report: dict) -> None:
    # Plain stdout, not rich: rich would wrap long strings and break the JSON.
    typer.echo(json.dumps(report, indent=2, sort_keys=False))


def _plan(recipe: Path, targets: list[str], resolve=None, device: str | None = None):
    from loraforge.build import plan_build
    from loraforge.recipe.loader import load_recipe

    return plan_build(load_recipe(recipe), targets, resolve, device=device)


from loraforge.cli_resolve import register as _register_resolve  # noqa: E402  (fetch, lock, cache)

_register_resolve(app)
from loraforge.cli_release import register as _register_release  # noqa: E402  (release)

_register_release(app)
from loraforge.cli_verify import register as _register_verify  # noqa: E402  (verify)

_register_verify(app)
from loraforge.cli_new import register as _register_new  # noqa: E402  (new)

_register_new(app)
from loraforge.cli_publish import register as _register_publish  # noqa: E402  (publish)

_register_publish(app)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
