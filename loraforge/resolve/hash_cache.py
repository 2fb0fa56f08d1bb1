"""A stat-keyed cache of file hashes, so unchanged inputs are not re-read.

Hashing a 7 GB SDXL checkpoint costs seconds on every build; like git's
index and A1111's hash cache, we remember a file's sha256 (and its
safetensors data-section sha256) together with its size, modification time
(ns), inode and device, and trust them only while all four are unchanged.
Entries are small JSON files written atomically, one per path, under
``$LORAFORGE_CACHE/hashes`` (default ``~/.cache/loraforge``), so concurrent
builds never corrupt each other. Set ``LORAFORGE_HASH_CACHE=0`` to always
re-hash.

The store uses the same cache for its blobs: a truncated or rewritten blob
changes its stat signature, is re-hashed, and so is caught before use.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from loraforge.atomic import write_text_atomic
from loraforge.errors import FormatError
from loraforge.formats.hashing import file_hashes, file_sha256


def cache_root() -> Path:
    configured = os.environ.get("LORAFORGE_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "loraforge"


def cached_file_sha256(path: Path) -> str:
    """sha256 of the file, from the cache when its stat signature is unchanged."""
    return cached_file_hashes(path)[0]


def cached_file_hashes(path: Path) -> tuple[str, str | None]:
    """(sha256, data-section sha256 or None when the file is not safetensors-shaped)."""
    path = Path(path).resolve()
    signature = _signature(path)
    entry_path = _entry_path(path)
    if os.environ.get("LORAFORGE_HASH_CACHE", "1") != "0":
        cached = _read_entry(entry_path)
        # Entries from before data hashes were cached lack the key: hash again, so the lock is complete.
        if cached is not None and cached.get("signature") == signature and _is_hex64(cached.get("sha256")) and "data_sha256" in cached:
            data = cached.get("data_sha256")
            return cached["sha256"], data if _is_hex64(data) else None
    try:
        hashes = file_hashes(path)
        digest, data_digest = hashes.sha256, hashes.data_sha256
    except FormatError:  # not a safetensors file: only the whole-file hash means anything
        digest, data_digest = file_sha256(path), None
    if _signature(path) == signature:  # do not remember a hash of a file that changed while we read it
        _write_entry(entry_path, {"path": str(path), "signature": signature, "sha256": digest, "data_sha256": data_digest})
    return digest, data_digest


def remember(path: Path, sha256: str, data_sha256: str | None) -> None:
    """Record hashes computed while the file was written, so its first use does not re-read it."""
    path = Path(path).resolve()
    _write_entry(_entry_path(path), {"path": str(path), "signature": _signature(path), "sha256": sha256, "data_sha256": data_sha256})


def hashed_signature(path: Path, sha256: str) -> list[int] | None:
    """The stat signature ``path`` had when it was hashed as ``sha256`` (the cache entry's), else None."""
    path = Path(path).resolve()
    cached = _read_entry(_entry_path(path))
    if cached is not None and cached.get("sha256") == sha256 and isinstance(cached.get("signature"), list):
        return cached["signature"]
    return None


def signature(path: Path) -> list[int] | None:
    """Size, modification time (ns), inode and device of ``path`` now; None when it cannot be read."""
    try:
        return _signature(Path(path).resolve())
    except OSError:
        return None


def forget(path: Path) -> None:
    """Drop the entry of a file that is about to disappear (verify's temporary rebuilds)."""
    try:
        _entry_path(Path(path).resolve()).unlink()
    except FileNotFoundError:
        pass


def _entry_path(path: Path) -> Path:
    return cache_root() / "hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:40] + ".json")


def _signature(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev]


def _read_entry(entry_path: Path) -> dict | None:
    try:
        return json.loads(entry_path.read_text())
    except (OSError, ValueError):
        return None  # missing or damaged: hash again


def _write_entry(entry_path: Path, entry: dict) -> None:
    """Best effort: a read-only or full cache directory only costs a re-hash next time."""
    try:
        entry_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(entry_path, json.dumps(entry, sort_keys=True))
    except OSError:
        pass


def _is_hex64(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
