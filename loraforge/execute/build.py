"""Run a BuildPlan: every target in dependency order."""

from __future__ import annotations

from typing import Callable

from loraforge.execute.bake import BakeResult, ProgressCallback, run_bake
from loraforge.execute.device import select_device
from loraforge.plan.model import BakeTarget, BuildPlan

# Given a target about to run, returns the callback that receives its progress.
ProgressFactory = Callable[[BakeTarget], ProgressCallback]


def run_build(plan: BuildPlan, device: str | None = None, progress: ProgressFactory | None = None) -> list[BakeResult]:
    """Build each planned target; ``device`` (from the CLI) overrides the recipe's."""
    results = []
    for target in plan.targets:
        torch_device = select_device(device or target.device)
        callback = progress(target) if progress else (lambda nbytes: None)
        results.append(run_bake(plan, target, torch_device, callback))
    return results
