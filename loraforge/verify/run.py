"""``loraforge verify``: rebuild into a temporary folder and compare with the lock.

Nothing the user owns is written: inputs are resolved without touching the
lock, every output goes under a fresh temporary folder (plan_build's
``output_dir``), no lock is written (the build driver's ``lock="none"``), and the
folder is removed whatever happens. The rebuilt files are then judged one by
one (:mod:`loraforge.verify.judge`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from loraforge import __version__
from loraforge.errors import ResolveError
from loraforge.execute.device import single_threaded_torch
from loraforge.plan.device_class import device_class
from loraforge.plan.numeric_environment import NumericEnvironment, target_environment
from loraforge.recipe.loader import LoadedRecipe, load_recipe
from loraforge.resolve.hash_cache import forget
from loraforge.resolve.lockfile import Lock, lock_path, read_lock
from loraforge.resolve.resolver import ResolveOptions
from loraforge.scratch import make_scratch_folder, remove_stale_scratch
from loraforge.verify.judge import Rebuilt, judge
from loraforge.verify.report import BYTE_IDENTICAL, TOLERANCE, WITHIN_TOLERANCE, InputDrift, TargetVerdict, VerifyReport
from loraforge.plan.tolerance import file_tolerance, is_svd_step


def verify_recipe(
    recipe: str | Path,
    selected: Sequence[str] = (),
    *,
    device: str | None = None,
    offline: bool = False,
    fetch_progress=None,
    build_progress=None,
) -> VerifyReport:
    """Rebuild the selected targets (all when none are named) and judge them against ``<recipe>.lock``."""
    from loraforge.execute.driver import drive_build
    from loraforge.build import plan_build

    loaded = load_recipe(recipe)
    lock = _read_lock(loaded)
    remove_stale_scratch()  # rebuilds of killed verify runs (loraforge/scratch.py)
    scratch = make_scratch_folder()
    try:
        options = ResolveOptions(offline=offline, **({"progress": fetch_progress} if fetch_progress else {}))
        plan = plan_build(loaded, selected, options, device=device, output_dir=scratch)
        drift = _input_drift(loaded, plan, lock)
        built = drive_build(plan, device=device, progress=build_progress, lock="none")
        with single_threaded_torch():  # small QRs and norms: extra threads only wait on each other
            verdicts = _judge_targets(loaded, plan, built, lock, scratch, device)
    finally:
        _remove(scratch)
    return VerifyReport(loaded.path, lock_path(loaded.path), drift, verdicts, _lock_notes(lock, plan.kinds.numeric_policies()))


def _remove(scratch: Path) -> None:
    """The temporary rebuild, and the hash-cache entries the build made for its files."""
    for path in scratch.rglob("*"):
        if path.is_file():
            forget(path)
    shutil.rmtree(scratch, ignore_errors=True)


def _read_lock(loaded: LoadedRecipe) -> Lock:
    path = lock_path(loaded.path)
    lock = read_lock(path)
    if lock is None:
        raise ResolveError(
            f"There is no lock file {path}: verify compares a rebuild with the hashes a build recorded there. "
            f"Build the recipe once (`loraforge build {loaded.path}`) and commit the lock, or put the lock "
            "published with the recipe next to it."
        )
    return lock


def _lock_notes(lock: Lock, policies: dict[str, str]) -> tuple[str, ...]:
    notes = []
    if lock.loraforge != __version__:
        notes.append(f"the lock was written by loraforge {lock.loraforge}, this is {__version__}: outputs may legitimately differ")
    if lock.numeric_policy != policies:
        changed = sorted(k for k in set(lock.numeric_policy) | set(policies)
                         if lock.numeric_policy.get(k) != policies.get(k))
        notes.append(f"the lock's numeric policy differs from this loraforge's for {', '.join(changed)}: outputs may legitimately differ")
    return tuple(notes)


# --- inputs ---------------------------------------------------------------------


def _input_drift(loaded: LoadedRecipe, plan, lock: Lock) -> tuple[InputDrift, ...]:
    drift = []
    for name, resolved in sorted(plan.inputs.items()):
        locked = (lock.inputs.get(name) or {}).get("sha256")
        if locked and locked != resolved.sha256:
            drift.append(InputDrift(name, locked, resolved.sha256, _readers(loaded, plan, name)))
    return tuple(drift)


def _readers(loaded: LoadedRecipe, plan, name: str) -> tuple[str, ...]:
    """Targets that read ``name``, directly or through other targets, in build order."""
    reached = {name}
    readers = []
    for target in plan.targets:  # dependency order: producers come first
        if any(dep in reached for dep in loaded.recipe.dependencies(target.name)):
            reached.add(target.name)
            readers.append(target.name)
    return tuple(readers)


# --- targets --------------------------------------------------------------------


def _judge_targets(loaded, plan, built, lock: Lock, scratch: Path, device: str | None) -> tuple[TargetVerdict, ...]:
    verdicts: list[TargetVerdict] = []
    approximate: set[str] = set()  # targets that reproduced only within tolerance
    results = {r.target: r for r in built.built}
    for planned in plan.targets:
        target = built.targets[planned.name]  # as finally planned (from its producers' real outputs)
        result = results[target.name]
        entry = lock.targets.get(target.name)
        rebuilt = _rebuilt(loaded, plan.kinds.of(target).operation_label(target), target, result, entry, scratch, device, approximate)
        verdict = judge(rebuilt, entry)
        if verdict.status == WITHIN_TOLERANCE:
            approximate.add(target.name)
        verdicts.append(verdict)
    return tuple(verdicts)


def _rebuilt(loaded, operation: str, target, result, entry: dict | None, scratch: Path, device: str | None, approximate: set[str]) -> Rebuilt:
    path = Path(result.written.path).resolve()
    on_disk = loaded.root.resolve() / path.relative_to(scratch)
    this_class = target.device_class or device_class(device or target.device)
    environment = target_environment(target)  # SVD steps only
    rule, tolerance, why = _rule(target, entry, environment, approximate, path)
    return Rebuilt(
        name=target.name,
        operation=operation,
        lora=target.produces == "lora",
        architecture=target.architecture,
        rebuilt_path=path,
        rebuilt_sha256=result.written.sha256,
        on_disk_path=on_disk,
        output=path.relative_to(scratch).as_posix(),
        device_class=this_class,
        rule=rule,
        tolerance=tolerance,
        why_tolerance=why,
        action_key=target.action_key,
        environment=environment,
        why_identical=_why_identical(environment) if rule == BYTE_IDENTICAL else None,
    )


def _rule(target, entry: dict | None, environment: NumericEnvironment | None, approximate: set[str], rebuilt: Path):
    """BYTE_IDENTICAL, or TOLERANCE with the allowed per-module error and the reason.

    An SVD step must reproduce byte for byte in the numeric environment the
    lock records, and within the lock's per-module tolerance in another one,
    or when the lock records none (written before loraforge recorded it).
    """
    if is_svd_step(target) and entry is not None and environment is not None:
        locked = NumericEnvironment.from_json(entry.get("numeric_environment"))
        if locked != environment:
            locked_tolerance = (entry.get("tolerance") or {}).get("relative_error")
            tolerance = float(locked_tolerance) if locked_tolerance is not None else file_tolerance(rebuilt)
            if locked is None:
                built = f"in a numeric environment the lock does not record (device class {entry.get('device_class') or 'unknown'})"
                how = ""
            else:
                built = f"on {locked.label()}"
                how = f" ({'; '.join(locked.differences(environment))})"
            return TOLERANCE, tolerance, (
                f"SVD step built {built}, rebuilt on {environment.label()}{how}: "
                f"compared within the lock's tolerance {tolerance:.3g} per module"
            )
    inexact = [dep for dep in target.dependencies if dep in approximate]
    if inexact:
        tolerance = file_tolerance(rebuilt)
        return TOLERANCE, tolerance, f"reads {', '.join(inexact)}, which reproduced within tolerance only: modules must agree within {tolerance:.3g}"
    return BYTE_IDENTICAL, None, None


def _why_identical(environment: NumericEnvironment | None) -> str | None:
    """Said when an SVD step that had to reproduce byte for byte did not."""
    if environment is None:
        return None
    return f"SVD step rebuilt in the numeric environment the lock records ({environment.label()}): its bytes must be identical"
