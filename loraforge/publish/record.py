"""What was published, recorded in ``<recipe>.lock`` (its ``published`` section).

``published`` maps each release to its destinations, and each destination
(``hf://ORG/REPO@BRANCH``) to the repository, branch, the commit that holds
the bundle and the sha256 of the bundle's manifest.json. ``endpoint`` is
added only for a hub other than huggingface.co. The lock keeps sections it
does not own (resolve/lockfile.py), so builds leave this one as it is.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.errors import PublishError
from loraforge.resolve.lockfile import lock_path, read_lock, write_lock
from loraforge.resolve.sources.hf import DEFAULT_ENDPOINT

SECTION = "published"


def record_publication(recipe_path: Path, release: str, destination, commit: str, manifest_sha256: str, endpoint: str) -> Path:
    path = lock_path(recipe_path)
    lock = read_lock(path)
    if lock is None:
        raise PublishError(f"{path} is missing, so the published commit {commit} cannot be recorded; the build "
                           "writes it. Run `loraforge build` on the recipe, then publish again (no second commit is made).")
    section = dict(lock.extra.get(SECTION) or {})
    destinations = dict(section.get(release) or {})
    entry = {"repo": destination.repo, "revision": destination.revision, "commit": commit, "manifest_sha256": manifest_sha256}
    if endpoint.rstrip("/") != DEFAULT_ENDPOINT:
        entry["endpoint"] = endpoint.rstrip("/")
    destinations[destination.url] = entry
    section[release] = dict(sorted(destinations.items()))
    lock.extra = {**lock.extra, SECTION: dict(sorted(section.items()))}
    write_lock(path, lock)
    return path


def published_entries(recipe_path: Path) -> dict:
    lock = read_lock(lock_path(recipe_path))
    return dict((lock.extra.get(SECTION) or {}) if lock else {})
