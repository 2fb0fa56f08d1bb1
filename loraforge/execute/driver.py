"""The build driver: run a plan with its lock, the way ``build``, ``release`` and ``verify`` do.

``lock`` says what the build does with ``<recipe>.lock`` (the one loaded
with the plan, kept by execute/state.py's BuildState):

- ``"record"`` (``build``, ``release``): each target is recorded as it
  finishes, so an interrupted build keeps what it built, and the inputs used
  are recorded at the end;
- ``"check"`` (``build --locked``): the planned targets must be the locked
  ones and each target's action key must match its entry before anything is
  built for it; the lock is never written;
- ``"none"`` (``verify``): the lock is not written.

Progress is reported through ``progress`` (a factory per target, as in
:func:`loraforge.execute.build.run_build`) while ``display`` (a context
manager, e.g. the CLI's progress bars) is open around the run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Collection, Literal

from loraforge.execute.build import BuildSummary, ProgressFactory, run_build
from loraforge.execute.executor import Executor, LocalExecutor
from loraforge.execute.jobs import parse_memory_size
from loraforge.execute.state import BuildState
from loraforge.plan.model import BuildPlan
from loraforge.resolve.lock_sync import check_locked_target, check_locked_targets

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
    executor: Executor | None = None,
) -> BuildSummary:
    """Build what is not up to date, keeping ``<recipe>.lock`` as ``lock`` says.

    ``executor`` defaults to this machine with ``jobs``, ``memory_budget`` and ``device``.
    """
    if executor is None:
        budget = parse_memory_size(memory_budget) if memory_budget else None
        executor = LocalExecutor(jobs=jobs, memory_budget=budget, device=device)
    state = BuildState(plan, record=lock == "record")
    check = None
    if lock == "check":
        check_locked_targets(plan, plan.lock)
        check = lambda target: check_locked_target(plan, target, plan.lock)  # noqa: E731
    with display if display is not None else nullcontext():
        summary = run_build(plan, progress, executor=executor, state=state, force=force, check=check)
    state.close()
    return summary
