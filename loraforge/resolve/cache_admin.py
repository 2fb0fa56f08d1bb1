"""Looking after the store: list, verify and garbage-collect blobs (`loraforge cache`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from loraforge.atomic import remove_stale, stale_temporaries
from loraforge.errors import FormatError, ResolveError
from loraforge.formats.hashing import file_hashes, file_sha256
from loraforge.resolve.lockfile import parse_lock_text
from loraforge.resolve.store import Store

SKIP_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv"}


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    path: Path
    size: int
    sources: tuple[str, ...]  # the sources (as written in recipes) last fetched as this blob


def list_blobs(store: Store) -> list[BlobInfo]:
    sources: dict[str, set[str]] = {}
    for ref in store.refs():
        source = ref.get("source")
        if isinstance(source, str) and ref.get("kind") == "source":
            sources.setdefault(ref["sha256"], set()).add(source)
    return [
        BlobInfo(path.name, path, path.stat().st_size, tuple(sorted(sources.get(path.name, ()))))
        for path in store.blobs()
    ]


def find_blob(store: Store, prefix: str) -> Path:
    """The blob whose sha256 starts with ``prefix`` (at least 6 hex digits, unambiguous)."""
    prefix = prefix.lower()
    if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
        raise ResolveError(f"'{prefix}' is not a sha256 prefix; give at least 6 hexadecimal digits.")
    matches = [p for p in store.blobs() if p.name.startswith(prefix)]
    if len(matches) != 1:
        found = "no blob" if not matches else f"{len(matches)} blobs"
        raise ResolveError(f"{found} in the store {store.root} start with {prefix}; `loraforge cache ls` lists them.")
    return matches[0]


def verify_blobs(store: Store, on_blob=lambda info, ok: None) -> list[BlobInfo]:
    """Re-hash every blob from disk (no hash cache); remove and return the damaged ones."""
    damaged = []
    for info in list_blobs(store):
        try:
            actual = file_hashes(info.path).sha256
        except FormatError:
            actual = file_sha256(info.path)
        ok = actual == info.sha256
        if not ok:
            store.remove(info.sha256)
            damaged.append(info)
        on_blob(info, ok)
    return damaged


def referenced_hashes(folders: Iterable[Path]) -> tuple[set[str], list[Path]]:
    """sha256s of inputs named by any loraforge lock file under ``folders`` (and the locks read)."""
    hashes: set[str] = set()
    locks: list[Path] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise ResolveError(f"{folder} is not a folder; give the folder(s) holding your recipes and their .lock files.")
        for path in sorted(_lock_files(Path(folder))):
            try:
                document = parse_lock_text(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
            if document is None:
                continue  # another tool's .lock file
            locks.append(path)
            for entry in (document.get("inputs") or {}).values():
                if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
                    hashes.add(entry["sha256"])
    return hashes, locks


def collect_garbage(store: Store, keep: set[str], dry_run: bool) -> list[BlobInfo]:
    """Remove (or with ``dry_run`` only list) blobs whose hash is not in ``keep``."""
    doomed = [info for info in list_blobs(store) if info.sha256 not in keep]
    if not dry_run:
        for info in doomed:
            store.remove(info.sha256)
        for ref in store.refs():
            if ref["sha256"] not in keep:
                ref["_file"].unlink(missing_ok=True)
    return doomed


def _lock_files(folder: Path):
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            if path.name not in SKIP_DIRS:
                yield from _lock_files(path)
        elif path.suffix == ".lock" and path.is_file():
            yield path



def stale_files(store: Store) -> list[Path]:
    """Temp files of killed runs in the store (``tmp/``): named with an owner pid that is gone."""
    return stale_temporaries(store.root / "tmp")


def remove_stale_files(store: Store) -> list[tuple[Path, int]]:
    """Delete :func:`stale_files`; (path, bytes freed) of each (for `loraforge cache gc` to report)."""
    return remove_stale(store.root / "tmp")
