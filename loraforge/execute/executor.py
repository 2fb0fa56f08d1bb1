"""The executor seam: who runs the targets of a build, where, and with what resources.

The build (execute/build.py) decides *what* runs and in which dependency
order; an executor decides *how*: on this machine one or several at a time
(``LocalExecutor``), or on the workers of a Ray cluster (``RayExecutor`` in
execute/ray_executor.py, imported only when asked for). An executor gets
three callables and a progress factory, and must keep their contract:

- ``prepare(name)`` is called in the calling thread once every target
  ``name`` reads is done; it returns the ``BuildJob`` to run (execute/job.py:
  the frozen plan, the target as planned now, the lock as it stands, the
  files it reads), or None when there is nothing to do (up to date);
- the executor runs ``job.run(resources, on_progress)`` anywhere it likes (a
  thread, a process, another machine; the job pickles): it computes from the
  job alone, with the ``Resources`` the executor chose;
- ``finish(job, result)`` is called in the calling thread, in plan order
  where the order is free, so the lock and the summary never depend on timing;
  only the calling thread ever writes the lock;
- ``progress(target)`` (when given) makes the callback for a target's
  progress display in the calling process: it gets the bytes written, live
  where the run is local, at the end where it is not;
- a failure is raised once the running targets have stopped, the first in
  plan order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

from loraforge.execute.device import select_device
from loraforge.execute.jobs import cancellable, run_concurrently
from loraforge.execute.resources import Resources
from loraforge.execute.run import ProgressCallback
from loraforge.plan.target import PlannedTarget

Prepare = Callable[[str], object | None]  # -> execute/job.py BuildJob, or None
Finish = Callable[[object, object], None]
# Given a target about to run, returns the callback that receives its progress.
ProgressFactory = Callable[[PlannedTarget], ProgressCallback]


class Executor(Protocol):
    def execute(
        self,
        order: Sequence[str],
        dependencies: Mapping[str, Sequence[str]],
        prepare: Prepare,
        finish: Finish,
        progress: ProgressFactory | None = None,
    ) -> None:
        """Run every job ``prepare`` returns for the targets of ``order``, each after the targets it reads."""
        ...


@dataclass(frozen=True)
class LocalExecutor:
    """This machine: up to ``jobs`` targets at once within ``memory_budget`` bytes (execute/jobs.py).

    Each run gets the device its target (or ``--device``) asks for and every
    core: heavy targets rarely overlap, and a run's bytes never depend on it.
    """

    jobs: int = 1
    memory_budget: int | None = None
    device: str | None = None  # the command line's --device, over each target's own

    def resources_for(self, target) -> Resources:
        return Resources.local(select_device(self.device or target.device))

    def execute(self, order, dependencies, prepare, finish, progress=None) -> None:
        def run(job, cancelled):
            resources = self.resources_for(job)
            callback = progress(job.target) if progress else (lambda nbytes: None)
            return job.run(resources, cancellable(callback, cancelled))

        run_concurrently(order, dependencies, prepare, run, finish, jobs=self.jobs, memory_budget=self.memory_budget)
