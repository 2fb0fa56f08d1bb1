"""Run a BuildPlan: every target in dependency order, each by its kind's runner."""

from __future__ import annotations

from typing import Callable

from loraforge.execute.bake import BakeResult, ProgressCallback, run_bake
from loraforge.execute.device import select_device
from loraforge.execute.merge import run_merge
from loraforge.execute.extract import run_extract
from loraforge.plan.extract import ExtractionTarget
from loraforge.plan.merge import MergeTarget
from loraforge.plan.model import BakeTarget, BuildPlan

# Given a target about to run, returns the callback that receives its progress.
ProgressFactory = Callable[[BakeTarget], ProgressCallback]

# Planned target type -> function(plan, target, torch device, progress callback) -> result.
TARGET_RUNNERS = {BakeTarget: run_bake, ExtractionTarget: run_extract, MergeTarget: run_merge}


def run_build(plan: BuildPlan, device: str | None = None, progress: ProgressFactory | None = None) -> list[BakeResult]:
    """Build each planned target; ``device`` (from the CLI) overrides the recipe's."""
    results = []
    for target in plan.targets:
        torch_device = select_device(device or target.device)
        callback = progress(target) if progress else (lambda nbytes: None)
        results.append(TARGET_RUNNERS[type(target)](plan, target, torch_device, callback))
    return results
