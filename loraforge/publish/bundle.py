"""The release bundle about to be published, checked against its own manifest and the lock.

What is uploaded is exactly the files ``manifest.json`` lists plus
``manifest.json`` itself, and only when the folder is still what the build
made: the manifest's sha256 is the one the lock recorded for the release,
and every listed file has its listed size and sha256. A folder edited since
(a file changed, added or removed) is refused: publishing it would put
files on the Hub that no recipe builds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import BuildError
from loraforge.release.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from loraforge.resolve.hash_cache import cached_file_sha256

GIT_BLOB_CHUNK = 8 << 20


@dataclass(frozen=True)
class LocalFile:
    name: str  # path in the bundle and in the repository (flat)
    path: Path
    size: int
    sha256: str

    def git_blob_id(self) -> str:
        """The git object id of the file (what the Hub reports for a file stored outside LFS)."""
        digest = hashlib.sha1(b"blob %d\0" % self.size)
        with open(self.path, "rb") as handle:
            while chunk := handle.read(GIT_BLOB_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    release: str
    folder: Path
    manifest: dict
    manifest_sha256: str
    files: tuple[LocalFile, ...]  # every listed file, then manifest.json

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> LocalFile | None:
        return next((f for f in self.files if f.name == name), None)


def read_bundle(release: str, folder: Path, locked_sha256: str | None) -> Bundle:
    """The bundle in ``folder``, or a BuildError saying how it differs from what was built."""
    rebuild = f"Run `loraforge build RECIPE {release}` (or `loraforge publish` without --locked) to rebuild it, then publish."
    manifest_path = folder / MANIFEST_NAME
    try:
        data = manifest_path.read_bytes()
        manifest = json.loads(data)
    except (OSError, ValueError):
        raise BuildError(f"The release folder {folder} has no readable {MANIFEST_NAME}, so it is not a built bundle. {rebuild}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or manifest.get("release") != release:
        raise BuildError(f"{manifest_path} is not the manifest of release '{release}' ({MANIFEST_FORMAT}). {rebuild}")
    manifest_sha256 = hashlib.sha256(data).hexdigest()
    if locked_sha256 is not None and manifest_sha256 != locked_sha256:
        raise BuildError(
            f"The bundle {folder} changed since it was built: its {MANIFEST_NAME} has sha256 {manifest_sha256[:12]}…, "
            f"the lock recorded {locked_sha256[:12]}…. Nothing was uploaded. {rebuild}"
        )
    files = []
    for entry in manifest.get("files") or []:
        files.append(_checked(folder, entry, rebuild))
    listed = {f.name for f in files} | {MANIFEST_NAME}
    extra = sorted(p.name for p in folder.iterdir() if p.name not in listed)
    if extra:
        raise BuildError(
            f"The bundle {folder} holds files its {MANIFEST_NAME} does not list ({', '.join(extra[:5])}"
            f"{', …' if len(extra) > 5 else ''}): it was changed since it was built, and publishing would upload "
            f"files no recipe builds. Nothing was uploaded. {rebuild}"
        )
    files.append(LocalFile(MANIFEST_NAME, manifest_path, len(data), manifest_sha256))
    return Bundle(release, folder, manifest, manifest_sha256, tuple(files))


def _checked(folder: Path, entry: dict, rebuild: str) -> LocalFile:
    try:
        name, size, sha256 = str(entry["file"]), int(entry["size"]), str(entry["sha256"])
    except (KeyError, TypeError, ValueError):
        raise BuildError(f"{folder / MANIFEST_NAME} has a malformed `files` entry ({entry!r}). {rebuild}") from None
    path = folder / name
    if "/" in name or name in ("", ".", "..") or path.is_symlink() or not path.is_file():
        raise BuildError(f"The bundle {folder} changed since it was built: {name} is missing or not a plain file. "
                         f"Nothing was uploaded. {rebuild}")
    actual_size = path.stat().st_size
    actual = cached_file_sha256(path) if actual_size == size else None
    if actual != sha256:
        raise BuildError(
            f"The bundle {folder} changed since it was built: {name} has "
            + (f"{actual_size} bytes, the manifest lists {size}" if actual is None else f"sha256 {actual[:12]}…, the manifest lists {sha256[:12]}…")
            + f". Nothing was uploaded. {rebuild}"
        )
    return LocalFile(name, path, size, sha256)
