"""Keeping ``<recipe>.lock`` in step with resolutions and builds.

``lock`` writes every input's entry; ``build`` (through execute/state.py's
BuildState, the lock's one owner during a build) updates the entries of the
inputs it used and of the targets it built, keeping the rest (entries of
inputs and targets the recipe no longer has are dropped). ``--locked``
compares instead of writing.
"""

from __future__ import annotations

from typing import Mapping

from loraforge import __version__
from loraforge.errors import ResolveError
from loraforge.recipe.loader import LoadedRecipe
from loraforge.resolve.local import ResolvedInput
from loraforge.resolve.lockfile import Lock, lock_path
from loraforge.resolve.secrets import redact_url


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
    *,
    numeric_policy: Mapping[str, str],
) -> Lock:
    """The lock after resolving ``inputs`` (and building ``targets``), from ``previous``;
    ``numeric_policy`` is this loraforge's (the target kinds' registry, plan/kinds.py)."""
    recipe = loaded.recipe
    old_inputs = previous.inputs if previous else {}
    new_inputs = {
        name: dict(entry)
        for name, entry in old_inputs.items()
        if name in recipe.inputs and _same_source(entry, recipe.inputs[name].source)
    }
    for name, resolved in inputs.items():
        new_inputs[name] = input_entry(resolved, old_inputs.get(name))
    new_targets = {name: dict(e) for name, e in (previous.targets if previous else {}).items() if name in recipe.targets}
    new_targets.update(targets or {})
    return Lock(
        inputs=dict(sorted(new_inputs.items())),
        targets=dict(sorted(new_targets.items())),
        loraforge=__version__,
        numeric_policy=dict(numeric_policy),
        extra=dict(previous.extra) if previous else {},
    )


def _same_source(entry: Mapping, source: str) -> bool:
    """The entry was written for ``source``: as written, or with its credentials REDACTED (resolve/secrets.py)."""
    return entry.get("source") in (source, redact_url(source))


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
