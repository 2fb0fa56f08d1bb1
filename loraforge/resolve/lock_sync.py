"""Keeping ``<recipe>.lock`` in step with resolutions and builds.

``lock`` writes every input's entry; ``build`` updates the entries of the
inputs it used and of the targets it built, keeping the rest (entries of
inputs and targets the recipe no longer has are dropped). ``--locked``
compares instead of writing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from loraforge import __version__
from loraforge.errors import ResolveError
from loraforge.plan.numeric_environment import target_environment
from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.local import ResolvedInput
from loraforge.resolve.lockfile import Lock, lock_path, numeric_policies, read_lock, write_lock
from loraforge.verify.tolerance import lock_tolerance_entry


def input_entry(resolved: ResolvedInput, previous: Mapping | None) -> dict:
    entry = dict(previous or {}) if previous and previous.get("sha256") == resolved.sha256 else {}
    entry.update({"source": resolved.source, "resolved": dict(sorted(resolved.location.items())), "sha256": resolved.sha256})
    if resolved.size is not None:
        entry["size"] = resolved.size
    if resolved.data_sha256 is not None:
        entry["data_sha256"] = resolved.data_sha256
    return entry


def updated_lock(
    loaded: LoadedRecipe,
    inputs: Mapping[str, ResolvedInput],
    targets: Mapping[str, dict] | None = None,
    previous: Lock | None = None,
) -> Lock:
    """The lock after resolving ``inputs`` (and building ``targets``), from ``previous``."""
    recipe = loaded.recipe
    old_inputs = previous.inputs if previous else {}
    new_inputs = {
        name: dict(entry)
        for name, entry in old_inputs.items()
        if name in recipe.inputs and entry.get("source") == recipe.inputs[name].source
    }
    for name, resolved in inputs.items():
        new_inputs[name] = input_entry(resolved, old_inputs.get(name))
    new_targets = {name: dict(e) for name, e in (previous.targets if previous else {}).items() if name in recipe.targets}
    new_targets.update(targets or {})
    return Lock(
        inputs=dict(sorted(new_inputs.items())),
        targets=dict(sorted(new_targets.items())),
        loraforge=__version__,
        numeric_policy=numeric_policies(),
        extra=dict(previous.extra) if previous else {},
    )


def target_entry(loaded: LoadedRecipe, target, result) -> dict:
    """A built target's lock entry: action key, output (relative to the recipe), size, hashes,
    and for steps whose bytes depend on the device class (SVDs), that class, the numeric
    environment they ran in (plan/numeric_environment.py) and the cross-environment tolerance."""
    written = result.written
    entry = {
        "action_key": target.action_key,
        "output": _relative(Path(written.path), loaded.root),
        "size": written.size,
        "sha256": written.sha256,
    }
    if written.data_sha256 is not None:
        entry["data_sha256"] = written.data_sha256
    device_class = getattr(target, "device_class", None)  # SVD steps only: their bytes depend on it
    if device_class is not None:
        entry["device_class"] = device_class
        entry["numeric_environment"] = target_environment(target).to_json()
        # What `verify` accepts per module from a rebuild in another numeric environment (verify/tolerance.py).
        entry["tolerance"] = lock_tolerance_entry(written.path)
    return entry


def record_built_target(plan, target, result) -> Path:
    """Update ``<recipe>.lock`` right after one target is built (so an interrupted build keeps it)."""
    return _update_lock(plan, {target.name: target_entry(plan.loaded, target, result)})


def write_lock_after_build(plan) -> Path:
    """Update ``<recipe>.lock`` with the inputs this build used (targets were recorded as they finished)."""
    return _update_lock(plan, {})


def _update_lock(plan, targets: Mapping[str, dict]) -> Path:
    loaded = plan.loaded
    path = lock_path(loaded.path)
    write_lock(path, updated_lock(loaded, plan.inputs, targets, read_lock(path)))
    return path


def check_locked_targets(plan, lock: Lock | None) -> None:
    """--locked: every planned target must be in the lock with the action key planned now.

    A target still waiting for a producer (no key yet) is checked when the
    build plans it again (run_build's ``check`` hook calls check_locked_target).
    """
    for target in plan.targets:
        if target.action_key is not None:
            check_locked_target(plan, target, lock)


def check_locked_target(plan, target, lock: Lock | None) -> None:
    if lock is None:
        return  # load_lock_for already refused a missing lock under --locked
    entry = lock.targets.get(target.name)
    if entry is None:
        raise ResolveError(
            f"--locked: target '{target.name}' is not in {lock_path(plan.loaded.path)}. Build it "
            "once without --locked to record it, and commit the lock."
        )
    if entry.get("action_key") != target.action_key:
        raise ResolveError(
            f"--locked: target '{target.name}' would be built differently from the lock (action key "
            f"{str(target.action_key)[:16]}… instead of {str(entry.get('action_key'))[:16]}…): its parameters, "
            "precision, device class, inputs or the bytes of a target it reads changed. Restore them, or build "
            "without --locked to update the lock."
        )


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive on Windows
        return str(path)
