"""Keeping ``<recipe>.lock`` in step with resolutions and builds.

``lock`` writes every input's entry; ``build`` updates the entries of the
inputs it used and of the targets it built, keeping the rest (entries of
inputs and targets the recipe no longer has are dropped). ``--locked``
compares instead of writing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from loraforge import __version__
from loraforge.errors import ResolveError
from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.local import ResolvedInput
from loraforge.resolve.lockfile import Lock, lock_path, numeric_policies, read_lock, write_lock


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


def target_entries(loaded: LoadedRecipe, planned: Iterable, results: Iterable) -> dict[str, dict]:
    """Lock entries of built targets: action key, output (relative to the recipe), size, sha256."""
    by_name = {target.name: target for target in planned}
    entries = {}
    for result in results:
        target = by_name[result.target]
        written = result.written
        entries[result.target] = {
            "action_key": target.action_key,
            "output": _relative(Path(written.path), loaded.root),
            "size": written.size,
            "sha256": written.sha256,
            "data_sha256": written.data_sha256,
        }
    return entries


def write_lock_after_build(plan, results) -> Path:
    """Update ``<recipe>.lock`` with the inputs this build used and the targets it built."""
    loaded = plan.loaded
    path = lock_path(loaded.path)
    previous = read_lock(path)
    lock = updated_lock(loaded, plan.inputs, target_entries(loaded, plan.targets, results), previous)
    write_lock(path, lock)
    return path


def check_locked_targets(plan, lock: Lock | None) -> None:
    """--locked: every planned target must be in the lock with the action key planned now."""
    if lock is None:
        return  # load_lock_for already refused a missing lock under --locked
    for target in plan.targets:
        entry = lock.targets.get(target.name)
        if entry is None:
            raise ResolveError(
                f"--locked: target '{target.name}' is not in {lock_path(plan.loaded.path)}. Build it "
                "once without --locked to record it, and commit the lock."
            )
        if entry.get("action_key") != target.action_key:
            raise ResolveError(
                f"--locked: target '{target.name}' would be built differently from the lock (action key "
                f"{target.action_key[:16]}… instead of {str(entry.get('action_key'))[:16]}…): its parameters, "
                "precision or inputs changed. Restore them, or build without --locked to update the lock."
            )


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive on Windows
        return str(path)
