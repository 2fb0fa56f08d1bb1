"""What one target's run is handed: the plan, what the executor lets it use, where progress goes,
and the build's lock as it stands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from loraforge.execute.resources import Resources
from loraforge.plan.model import BuildPlan
from loraforge.resolve.lockfile import Lock

ProgressCallback = Callable[[int], None]  # called with the bytes just written


@dataclass(frozen=True)
class TargetRun:
    plan: BuildPlan
    resources: Resources  # the device and CPU threads the executor chose for this run
    progress: ProgressCallback
    lock: Lock | None  # the lock with every target finished so far (a release bundles its entries)
