"""Run a BuildPlan: every target in dependency order, each by its kind's runner.

A target whose output is up to date (plan/status.py) is skipped unless
forced. After a target is built its output counts as built for the targets
that read it: they are planned again from the real file (their action key
needs its sha256), and may turn out up to date when the bytes did not change.
With ``jobs > 1`` independent targets run side by side (execute/jobs.py);
each target's bytes do not depend on that, so neither does the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection

from loraforge.execute.bake import ProgressCallback, run_bake
from loraforge.execute.device import select_device
from loraforge.execute.extract import run_extract
from loraforge.execute.jobs import cancellable, run_concurrently
from loraforge.execute.merge import run_merge
from loraforge.execute.release import run_release
from loraforge.plan.context import BuiltOutput
from loraforge.plan.extract import ExtractionTarget
from loraforge.plan.merge import MergeTarget
from loraforge.plan.model import BakeTarget, BuildPlan
from loraforge.plan.planner import plan_target
from loraforge.plan.release import ReleaseTarget
from loraforge.plan.status import UP_TO_DATE
from loraforge.resolve.hash_cache import remember

# Given a target about to run, returns the callback that receives its progress.
ProgressFactory = Callable[[object], ProgressCallback]
# Called (in the thread that runs the build) after each target is built: the CLI writes the lock there.
BuiltCallback = Callable[[BuildPlan, object, object], None]

# Planned target type -> function(plan, target, torch device, progress callback) -> result.
TARGET_RUNNERS = {BakeTarget: run_bake, ExtractionTarget: run_extract, MergeTarget: run_merge, ReleaseTarget: run_release}


@dataclass
class BuildSummary:
    built: list = field(default_factory=list)  # runner results, in plan order
    up_to_date: list[str] = field(default_factory=list)  # targets skipped, in plan order


def run_build(
    plan: BuildPlan,
    device: str | None = None,
    progress: ProgressFactory | None = None,
    *,
    jobs: int = 1,
    force: Collection[str] = (),
    memory_budget: int | None = None,
    on_built: BuiltCallback | None = None,
    check: Callable[[object], None] | None = None,
) -> BuildSummary:
    """Build what is not up to date; ``device`` (from the CLI) overrides the recipe's.

    ``force`` names targets to rebuild even when up to date. ``on_built`` is
    called after each target, so an interrupted build keeps (and records) the
    targets that finished. ``check(target)`` runs on each target once its
    action key is known, before anything is built for it (--locked).
    """
    order = [target.name for target in plan.targets]
    summary = BuildSummary()
    results: dict[str, object] = {}

    def prepare(name: str):
        """The target to run now, or None when it is up to date (called when its producers are done)."""
        target = _current(plan, name)
        if check is not None:
            check(target)
        if plan.state[name] == UP_TO_DATE and name not in force:
            summary.up_to_date.append(name)
            return None
        return target

    def run(target, cancelled: Callable[[], bool]):
        callback = progress(target) if progress else (lambda nbytes: None)
        torch_device = select_device(device or target.device)
        return TARGET_RUNNERS[type(target)](plan, target, torch_device, cancellable(callback, cancelled))

    def finish(target, result) -> None:
        written = result.written
        remember(written.path, written.sha256, written.data_sha256)  # the next build need not re-read it
        plan.context.built[target.name] = BuiltOutput(target.output, written.sha256)
        results[target.name] = result
        if on_built is not None:
            on_built(plan, target, result)

    dependencies = {t.name: tuple(d for d in t.dependencies if d in order) for t in plan.targets}
    run_concurrently(order, dependencies, prepare, run, finish, jobs=jobs, memory_budget=memory_budget)
    summary.built = [results[name] for name in order if name in results]
    summary.up_to_date.sort(key=order.index)
    return summary


def _current(plan: BuildPlan, name: str):
    """The target as planned, or planned again when a target it reads was (re)built since."""
    context = plan.context
    if context.needs_replanning(name):
        plan.state[name] = plan_target(context, name)
    return context.planned[name]
