"""Running independent targets side by side (`build --jobs N`) within a memory budget.

A target starts when every target it reads is done, at most ``jobs`` run at
once, and a target starts only while the estimated peak memory of the
running ones plus its own (each planned target's ``memory_bytes``) fits the
budget; one target always may run, whatever its estimate. Preparing and
finishing targets (planning, lock writes) happen in the calling thread, in a
fixed order where the order is free, so only the timing depends on ``jobs``.

When one target fails, or Ctrl-C / SIGTERM arrives, the others are told to
stop at their next progress report (their writers delete their temp files),
and the first failure in plan order is raised once they have.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Mapping, Sequence

from loraforge.errors import BuildError

POLL_SECONDS = 0.2  # how often the waiting thread wakes, so Ctrl-C is handled promptly


class BuildCancelled(BaseException):
    """Raised from a progress callback to stop a target (another one failed, or Ctrl-C). Not an
    Exception, so no runner's error handling swallows it; every writer still removes its temp file."""


def cancellable(callback: Callable[[int], None], cancelled: Callable[[], bool]) -> Callable[[int], None]:
    """The progress callback, raising BuildCancelled once ``cancelled()`` is true."""

    def on_progress(nbytes: int) -> None:
        if cancelled():
            raise BuildCancelled()
        callback(nbytes)

    return on_progress


def default_memory_budget() -> int:
    """Half of the machine's physical memory (the rest is for the OS, the page cache and other programs)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume 8 GiB
        return 8 << 30


def parse_memory_size(text: str) -> int:
    """Bytes from "12G", "512M", "1.5GiB" or a plain byte count (--memory-budget)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in units and cleaned[-1:] else (cleaned, "")
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        value = -1
    if not value > 0 or value == float("inf"):  # also NaN ("nanG") and "infG"
        raise BuildError(f"--memory-budget {text!r} is not a size; write it like 12G, 512M or 8GiB.")
    return int(value)


def run_concurrently(
    order: Sequence[str],
    dependencies: Mapping[str, Sequence[str]],
    prepare: Callable[[str], object | None],
    run: Callable[[object, Callable[[], bool]], object],
    finish: Callable[[object, object], None],
    *,
    jobs: int = 1,
    memory_budget: int | None = None,
) -> None:
    """prepare(name) -> a job (execute/job.py BuildJob: its ``name`` and ``memory_bytes`` are read here), or
    None when there is nothing to do; run(job, cancelled) -> result (in a worker thread when jobs > 1);
    finish(job, result) in this thread."""
    if jobs <= 1:
        for name in order:
            target = prepare(name)
            if target is not None:
                finish(target, run(target, lambda: False))
        return
    _Scheduler(order, dependencies, prepare, run, finish, jobs, memory_budget or default_memory_budget()).run()


class _Scheduler:
    def __init__(self, order, dependencies, prepare, run, finish, jobs: int, budget: int):
        self.order, self.dependencies = list(order), dependencies
        self.prepare, self.run_target, self.finish = prepare, run, finish
        self.jobs, self.budget = jobs, budget
        self.done: set[str] = set()
        self.waiting = list(order)  # not prepared yet
        self.ready: list = []  # prepared, not started
        self.running: dict[Future, object] = {}
        self.cancel = threading.Event()
        self.failures: dict[str, BaseException] = {}

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="loraforge-job") as pool:
            try:
                while (self.waiting or self.ready or self.running) and not self.failures:
                    self._prepare_ready()
                    self._start(pool)
                    self._collect(wait(self.running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED).done)
            except BaseException:
                self.cancel.set()
                self._drain()
                raise
            if self.failures:
                self.cancel.set()
                self._drain()
                raise self.failures[min(self.failures, key=self.order.index)]

    def _prepare_ready(self) -> None:
        progressed = True
        while progressed:
            progressed = False
            for name in list(self.waiting):
                if all(dep in self.done for dep in self.dependencies.get(name, ())):
                    self.waiting.remove(name)
                    target = self.prepare(name)
                    if target is None:
                        self.done.add(name)
                        progressed = True  # its dependents may be ready now
                    else:
                        self.ready.append(target)

    def _start(self, pool: ThreadPoolExecutor) -> None:
        while self.ready and len(self.running) < self.jobs:
            target = self.ready[0]
            in_use = sum(t.memory_bytes for t in self.running.values())
            if self.running and in_use + target.memory_bytes > self.budget:
                return
            self.ready.pop(0)
            self.running[pool.submit(self.run_target, target, self.cancel.is_set)] = target

    def _collect(self, finished) -> None:
        for future in sorted(finished, key=lambda f: self.order.index(self.running[f].name)):
            target = self.running.pop(future)
            try:
                result = future.result()
            except BaseException as error:  # noqa: B902  (re-raised after the others stop)
                self.failures[target.name] = error
                continue
            self.finish(target, result)
            self.done.add(target.name)

    def _drain(self) -> None:
        """Wait for running targets to stop (they see the cancel flag); keep real failures, and
        finish the ones that completed anyway, so their outputs are recorded."""
        for future, target in sorted(self.running.items(), key=lambda item: self.order.index(item[1].name)):
            try:
                result = future.result()
            except BuildCancelled:
                continue
            except BaseException as error:  # noqa: B902
                self.failures.setdefault(target.name, error)
                continue
            self.finish(target, result)
        self.running.clear()
