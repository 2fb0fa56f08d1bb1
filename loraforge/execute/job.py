"""One target's build as a self-contained, picklable job: what every executor runs.

The driver (execute/build.py) makes a ``BuildJob`` for each target it
prepares: the frozen plan, the target as planned now (after any re-planning
from its producers' real outputs), the lock as it stands (a release bundles
its entries) and the files the target reads (path and sha256, so an executor
whose workers cannot see the driver's paths can ship them through a store).
``job.run(resources, progress)`` builds it the same way wherever it runs: in
the driver's process (LocalExecutor), or in a Ray worker on this or another
machine (execute/ray_executor.py), where it arrives pickled.

Pickling: the plan holds ``types.MappingProxyType`` views (read-only
mappings), which the standard pickler refuses; a job pickles itself through a
pickler that stores them as plain dicts and rebuilds the views, so
``pickle.dumps(job)`` works with any pickler (standard, cloudpickle, Ray's)
and no global pickling state is touched.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from loraforge.execute.resources import Resources
from loraforge.execute.run import TargetRun
from loraforge.plan.model import BuildPlan
from loraforge.plan.target import PlannedTarget
from loraforge.resolve.lockfile import Lock


@dataclass(frozen=True)
class ReadFile:
    """A file a target reads: where the driver has it, and its sha256 (its key in a store)."""

    name: str  # the input or target it is
    path: Path
    sha256: str


@dataclass(frozen=True)
class BuildJob:
    plan: BuildPlan | None  # None only while shipped apart from it (``without_plan``)
    target: PlannedTarget
    lock: Lock | None  # the build's lock when the job was made: every target it reads is recorded
    reads: tuple[ReadFile, ...] = ()

    # What schedulers read, the target's own.
    @property
    def name(self) -> str:
        return self.target.name

    @property
    def memory_bytes(self) -> int:
        return self.target.memory_bytes

    @property
    def device(self) -> str:
        return self.target.device

    def run(self, resources: Resources, progress: Callable[[int], None]):
        """Build the target with ``resources``; ``progress`` gets the bytes written. Returns the kind's result."""
        plan = self.plan
        return plan.kinds.of(self.target).run(self.target, TargetRun(plan, resources, progress, self.lock))

    def without_plan(self) -> BuildJob:
        """The job minus its plan, to ship next to one shared copy of the plan (``with_plan`` joins them)."""
        return replace(self, plan=None)

    def with_plan(self, plan: BuildPlan) -> BuildJob:
        return replace(self, plan=plan)

    def __reduce__(self):
        return _loads, (dumps(self.__dict__),)


def dumps(value) -> bytes:
    """Pickle ``value`` (a job, a plan, a result) with read-only mapping views stored as dicts."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(value)
    return buffer.getvalue()


def loads(data: bytes):
    return pickle.loads(data)


def mapping_view(items: dict) -> types.MappingProxyType:
    """A read-only view of ``items`` (how an unpickled MappingProxyType is rebuilt)."""
    return types.MappingProxyType(items)


def _reduce_mapping_view(view: types.MappingProxyType):
    return mapping_view, (dict(view),)


def _loads(data: bytes) -> BuildJob:
    fields = pickle.loads(data)
    job = object.__new__(BuildJob)
    for key, value in fields.items():
        object.__setattr__(job, key, value)
    return job


_DISPATCH = copyreg.dispatch_table.copy()
_DISPATCH[types.MappingProxyType] = _reduce_mapping_view
