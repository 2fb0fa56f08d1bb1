"""The executor seam: who runs the targets of a build, where, and with what resources.

The build (execute/build.py) decides *what* runs and in which dependency
order; an executor decides *how*: on this machine one or several at a time
(``LocalExecutor``), or later on a GPU host or a cluster. An executor gets
four callables and must keep their contract:

- ``prepare(name)`` is called in the calling thread once every target
  ``name`` reads is done; it returns the planned target to run, or None when
  there is nothing to do (up to date);
- ``run(target, resources, cancelled)`` builds one target and may run anywhere
  the executor likes (a thread, a process, another machine): it computes from
  the frozen planned target alone, with the ``Resources`` the executor chose;
- ``finish(target, result)`` is called in the calling thread, in plan order
  where the order is free, so the lock and the summary never depend on timing;
- a failure is raised once the running targets have stopped, the first in
  plan order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

from loraforge.execute.device import select_device
from loraforge.execute.jobs import run_concurrently
from loraforge.execute.resources import Resources

Prepare = Callable[[str], object | None]
Run = Callable[[object, Resources, Callable[[], bool]], object]
Finish = Callable[[object, object], None]


class Executor(Protocol):
    def execute(
        self, order: Sequence[str], dependencies: Mapping[str, Sequence[str]], prepare: Prepare, run: Run, finish: Finish
    ) -> None:
        """Run every target of ``order`` that ``prepare`` returns, each after the targets it reads."""
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

    def execute(self, order, dependencies, prepare, run, finish) -> None:
        run_concurrently(
            order, dependencies, prepare,
            lambda target, cancelled: run(target, self.resources_for(target), cancelled),
            finish, jobs=self.jobs, memory_budget=self.memory_budget,
        )
