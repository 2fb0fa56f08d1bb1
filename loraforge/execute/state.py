"""What a build has done so far, and the one lock it keeps (the lock's only owner during a build).

The plan (plan/model.py) never changes; this holds what does: each target as
currently planned, which outputs exist and are current, and ``<recipe>.lock``
as loaded when planning plus every entry recorded since. A target whose
producers were (re)built since it was planned is planned again from their
real outputs by ``plan/planner.replan_target``, a pure function.

With ``record`` (``build``, ``release``) the lock is updated and its file
rewritten after each target, so an interrupted build keeps what finished;
otherwise (``--locked``, ``verify``) the lock stays as loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraforge.plan.context import BuiltOutput
from loraforge.plan.model import BuildPlan
from loraforge.plan.numeric_environment import target_environment
from loraforge.plan.planner import replan_target
from loraforge.plan.status import UP_TO_DATE
from loraforge.plan.target import PlannedTarget
from loraforge.plan.tolerance import lock_tolerance_entry
from loraforge.errors import BuildError
from loraforge.resolve.hash_cache import cached_file_sha256, hashed_signature, remember, signature
from loraforge.resolve.lock_sync import updated_lock
from loraforge.resolve.lockfile import Lock, lock_path, write_lock


class BuildState:
    def __init__(self, plan: BuildPlan, *, record: bool):
        self.plan = plan
        self.record = record
        self.lock: Lock | None = plan.lock
        self.planned: dict[str, PlannedTarget] = {t.name: t for t in plan.targets}
        self.states: dict[str, str] = dict(plan.state)
        self.built: dict[str, BuiltOutput] = dict(plan.context.built) if plan.context else {}
        # target -> the built outputs (name -> sha256) it was planned with, to know when to plan it again
        self.planned_with = {name: self._built_producers(name) for name in self.planned}
        self.input_files = InputFiles(plan.inputs)

    def current(self, name: str) -> tuple[PlannedTarget, str]:
        """The target as it must be built now, and its state: planned again if a producer changed.
        BuildError when an input it reads is no longer the file that was hashed (InputFiles)."""
        if self._built_producers(name) != self.planned_with[name]:
            target, state = replan_target(self.plan, name, self.planned, self.built)
            self.planned[name], self.states[name] = target, state
            self.planned_with[name] = self._built_producers(name)
            if state == UP_TO_DATE and self.lock is not None and name in self.lock.targets:
                # Up to date once its producers were rebuilt to the same bytes: its output counts as built,
                # so the targets that read it are planned again too (a release planned while it was still
                # waiting would otherwise record its stale plan: no action key).
                self.built[name] = BuiltOutput(target.output, self.lock.targets[name]["sha256"])
        target = self.planned[name]
        reads = target.read_hashes if target.read_hashes is not None else self.plan.loaded.recipe.dependencies(name)
        self.input_files.check(name, [n for n in reads if n in self.plan.inputs])
        return target, self.states[name]

    def finished(self, target: PlannedTarget, result) -> None:
        """Target built: its output counts as built for its readers; its lock entry is recorded."""
        written = result.written
        remember(written.path, written.sha256, written.data_sha256)  # the next build need not re-read it
        self.built[target.name] = BuiltOutput(target.output, written.sha256)
        self._update_lock({target.name: self._entry(target, result)})

    def close(self) -> None:
        """The build is over: record the inputs it used (targets were recorded as they finished)."""
        self._update_lock({})

    def _update_lock(self, targets: dict[str, dict]) -> None:
        if not self.record:  # --locked and verify: the lock stays as loaded, in memory too (a release bundles it)
            return
        plan = self.plan
        self.lock = updated_lock(plan.loaded, plan.inputs, targets, self.lock, numeric_policy=plan.kinds.numeric_policies())
        write_lock(lock_path(plan.loaded.path), self.lock)

    def _built_producers(self, name: str) -> dict[str, str]:
        recipe = self.plan.loaded.recipe
        return {d: self.built[d].sha256 for d in recipe.dependencies(name) if d in recipe.targets and d in self.built}

    def _entry(self, target: PlannedTarget, result) -> dict:
        """A built target's lock entry: action key, output (relative to the recipe), size, hashes; for
        targets whose bytes depend on the device class (SVD steps), that class, the numeric environment
        they ran in (plan/numeric_environment.py) and the cross-environment tolerance (plan/tolerance.py)."""
        written = result.written
        entry = {
            "action_key": target.action_key,
            "output": _relative(Path(written.path), self.plan.loaded.root),
            "size": written.size,
            "sha256": written.sha256,
        }
        if written.data_sha256 is not None:
            entry["data_sha256"] = written.data_sha256
        if target.device_class is not None:
            entry["device_class"] = target.device_class
            entry["numeric_environment"] = target_environment(target).to_json()
            entry["tolerance"] = lock_tolerance_entry(written.path)
        return entry


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive on Windows
        return str(path)


class InputFiles:
    """Each input's file as it was hashed; re-checked before every target that reads it.

    A file replaced or rewritten on disk between two targets of one build would
    otherwise be read with its new bytes while the lock and every output's
    provenance record the sha256 hashed at plan time. The check is stat-keyed:
    size, modification time, inode and device as they were when the file was
    hashed (the hash cache's entry, else as first seen here); a file whose stat
    changed is hashed again, and a new sha256 stops the build.
    """

    def __init__(self, inputs):
        self.inputs = inputs
        self.seen: dict[str, list[int] | None] = {}
        for name, resolved in inputs.items():
            if resolved.path is not None and resolved.sha256 is not None:
                self.seen[name] = hashed_signature(resolved.path, resolved.sha256) or signature(resolved.path)

    def check(self, target: str, names) -> None:
        for name in names:
            if name not in self.seen:
                continue
            resolved = self.inputs[name]
            now = signature(resolved.path)
            if now is not None and now == self.seen[name]:
                continue
            try:
                actual = None if now is None else cached_file_sha256(resolved.path)
            except OSError:
                actual = None
            if actual == resolved.sha256:
                self.seen[name] = now  # touched, same bytes
                continue
            found = "is gone or cannot be read" if actual is None else f"now has sha256 {actual[:16]}…"
            raise BuildError(
                f"input '{name}' ({resolved.path}) changed on disk during this build: it was hashed as sha256 "
                f"{resolved.sha256[:16]}… when the build was planned and {found}. Target '{target}' was not built "
                "(targets built before it used the old bytes, which the lock records). Leave the file alone while a "
                "build runs, then build again to use the new bytes."
            )
