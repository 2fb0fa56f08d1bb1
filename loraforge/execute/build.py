"""Run a BuildPlan: every target in dependency order, each by its kind (plan.kinds), on an executor.

A target whose output is up to date (plan/status.py) is skipped unless
forced. After a target is built its output counts as built for the targets
that read it: they are planned again from the real file (their action key
needs its sha256; execute/state.py), and may turn out up to date when the
bytes did not change. Each target to build is handed to the executor
(execute/executor.py) as a self-contained ``BuildJob`` (execute/job.py); the
executor decides where and how many run at once, and each target's bytes do
not depend on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection

from loraforge.execute.executor import Executor, LocalExecutor, ProgressFactory
from loraforge.execute.job import BuildJob, ReadFile
from loraforge.execute.state import BuildState
from loraforge.plan.model import BuildPlan
from loraforge.plan.outputs import other_recipe_writer
from loraforge.plan.status import UP_TO_DATE
from loraforge.plan.target import PlannedTarget


@dataclass
class BuildSummary:
    built: list = field(default_factory=list)  # runner results, in plan order
    up_to_date: list[str] = field(default_factory=list)  # targets skipped, in plan order
    targets: dict[str, PlannedTarget] = field(default_factory=dict)  # every target as it was finally planned
    kinds: object = None  # the plan's TargetKinds, to describe the results


def refuse_other_recipes_output(plan: BuildPlan, target: PlannedTarget) -> None:
    """BuildError when ``target`` would replace an output another recipe of the folder wrote (plan/outputs.py)."""
    other = other_recipe_writer(plan.loaded, Path(target.output))
    if other is not None:
        loaded, ours = plan.loaded, plan.loaded.path.name
        written = os.path.relpath(target.output, loaded.root)
        field = ("targets", target.name, "output") if loaded.recipe.targets[target.name].output else ("targets", target.name)
        raise loaded.error(
            field,
            f"target {target.name!r} would replace {written}, which the recipe {other} in the same folder wrote; "
            f"each build would overwrite the other's output and leave the other's lock out of date",
            f"give each recipe its own output path (output: in {ours} or in {other}); to replace it anyway, "
            f"loraforge build --force {ours} {target.name}",
        )


def run_build(
    plan: BuildPlan,
    progress: ProgressFactory | None = None,
    *,
    device: str | None = None,
    executor: Executor | None = None,
    state: BuildState | None = None,
    force: Collection[str] = (),
    check: Callable[[PlannedTarget], None] | None = None,
) -> BuildSummary:
    """Build what is not up to date with ``executor`` (by default this machine, one target at a
    time, on ``device`` or each target's own).

    ``state`` keeps the lock (execute/state.py; by default it is left as
    loaded: execute/driver.py's ``drive_build`` records it).
    ``force`` names targets to rebuild even when up to date. ``check(target)``
    runs on each target once its action key is known, before anything is
    built for it (--locked).
    """
    executor = executor or LocalExecutor(device=device)
    state = state or BuildState(plan, record=False)
    order = [target.name for target in plan.targets]
    summary = BuildSummary(kinds=plan.kinds)
    results: dict[str, object] = {}

    def prepare(name: str) -> BuildJob | None:
        target, status = state.current(name)
        if check is not None:
            check(target)
        if status == UP_TO_DATE and name not in force:
            summary.up_to_date.append(name)
            return None
        if name not in force:
            refuse_other_recipes_output(plan, target)
        return BuildJob(plan, target, state.lock, _reads(plan, state, target))

    def finish(job: BuildJob, result) -> None:
        state.finished(job.target, result)
        results[job.name] = result

    dependencies = {t.name: tuple(d for d in t.dependencies if d in order) for t in plan.targets}
    executor.execute(order, dependencies, prepare, finish, progress)
    summary.built = [results[name] for name in order if name in results]
    summary.up_to_date.sort(key=order.index)
    summary.targets = dict(state.planned)
    return summary


def _reads(plan: BuildPlan, state: BuildState, target: PlannedTarget) -> tuple[ReadFile, ...]:
    """The files ``target`` reads (inputs, and outputs of the targets it reads) with their sha256, in name order."""
    reads = []
    for name, sha256 in sorted((target.read_hashes or {}).items()):
        resolved = plan.inputs.get(name)
        path = resolved.path if resolved is not None else (state.built[name].path if name in state.built else None)
        if path is not None:
            reads.append(ReadFile(name, Path(path), sha256))
    return tuple(reads)
