"""Whether a target's output on disk is already what the plan would build.

The lock is the record: a target is up to date when the lock holds its
planned action key and its output file is present with the sha256 the lock
recorded. The file's hash comes from the stat-keyed hash cache, so a second
build re-reads nothing; any write to the file changes its size or mtime and
so forces a re-hash (`loraforge verify` always re-reads everything).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from loraforge.resolve.hash_cache import cached_file_sha256

UP_TO_DATE, STALE, MISSING, WAITING = "up to date", "stale", "missing", "waiting"


def identity_path(target) -> Path:
    """The file whose sha256 and size the lock records for a target (its output, or a bundle's manifest)."""
    return Path(getattr(target, "identity_path", None) or target.output)


def target_state(target, lock_entry: Mapping | None) -> str:
    """UP_TO_DATE, STALE (other key, edited or damaged output), MISSING, or WAITING (a producer is unbuilt)."""
    if target.action_key is None:
        return WAITING
    path = identity_path(target)
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
    intact = getattr(target, "intact", None)  # targets of several files (a release bundle) check the rest
    return UP_TO_DATE if intact is None or intact() else STALE
