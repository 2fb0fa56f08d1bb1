"""The build driver: run a plan with its lock, the way ``build``, ``release`` and ``verify`` do.

``lock`` says what the build does with ``<recipe>.lock``:

- ``"record"`` (``build``, ``release``): each target is recorded as it
  finishes, so an interrupted build keeps what it built, and the inputs used
  are recorded at the end;
- ``"check"`` (``build --locked``): the planned targets must be the locked
  ones and each target's action key must match its entry before anything is
  built for it; the lock is never written;
- ``"none"`` (``verify``): the lock is neither read nor written here.

Progress is reported through ``progress`` (a factory per target, as in
:func:`loraforge.execute.build.run_build`) while ``display`` (a context
manager, e.g. the CLI's progress bars) is open around the run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Collection, Literal

from loraforge.execute.build import BuildSummary, ProgressFactory, run_build
from loraforge.execute.jobs import parse_memory_size
from loraforge.plan.model import BuildPlan

LockMode = Literal["record", "check", "none"]


def drive_build(
    plan: BuildPlan,
    *,
    device: str | None = None,
    progress: ProgressFactory | None = None,
    display: AbstractContextManager | None = None,
    lock: LockMode = "record",
    force: Collection[str] = (),
    jobs: int = 1,
    memory_budget: str | None = None,
) -> BuildSummary:
    """Build what is not up to date, keeping ``<recipe>.lock`` as ``lock`` says."""
    from loraforge.resolve.lock_sync import (
        check_locked_target,
        check_locked_targets,
        record_built_target,
        write_lock_after_build,
    )
    from loraforge.resolve.lockfile import lock_path, read_lock

    budget = parse_memory_size(memory_budget) if memory_budget else None
    on_built = check = None
    if lock == "check":
        locked = read_lock(lock_path(plan.loaded.path))
        check_locked_targets(plan, locked)
        check = lambda target: check_locked_target(plan, target, locked)  # noqa: E731
    elif lock == "record":
        on_built = record_built_target
    with display if display is not None else nullcontext():
        summary = run_build(
            plan, device=device, progress=progress, jobs=jobs, force=force,
            memory_budget=budget, on_built=on_built, check=check,
        )
    if lock == "record":
        write_lock_after_build(plan)
    return summary
