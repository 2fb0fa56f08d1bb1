"""Whether a target's output on disk is already what the plan would build.

The lock is the record: a target is up to date when the lock holds its
planned action key and its output file is present with the sha256 the lock
recorded. The file's hash comes from the stat-keyed hash cache, so a second
build re-reads nothing; any write to the file changes its size or mtime and
so forces a re-hash (`loraforge verify` always re-reads everything).
"""

from __future__ import annotations

from typing import Mapping

from loraforge.plan.target import PlannedTarget
from loraforge.resolve.hash_cache import cached_file_sha256

UP_TO_DATE, STALE, MISSING, WAITING = "up to date", "stale", "missing", "waiting"


def target_state(target: PlannedTarget, lock_entry: Mapping | None) -> str:
    """UP_TO_DATE, STALE (other key, edited or damaged output), MISSING, or WAITING (a producer is unbuilt)."""
    if target.action_key is None:
        return WAITING
    path = target.recorded_path()
    if not path.is_file():
        return MISSING
    if not lock_entry or lock_entry.get("action_key") != target.action_key:
        return STALE
    try:
        current = cached_file_sha256(path)
    except OSError:
        return STALE
    if current != lock_entry.get("sha256"):
        return STALE
    return UP_TO_DATE if target.intact() else STALE  # a bundle also checks the files its manifest lists
