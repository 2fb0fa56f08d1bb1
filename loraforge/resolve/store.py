"""The content-addressed store: every fetched input, kept under its sha256.

Layout under ``$LORAFORGE_CACHE/store`` (default ``~/.cache/loraforge/store``)::

    blobs/sha256/ab/ab12…   one read-only file per content hash
    partial/<key>.part      an interrupted download, resumed with Range next time
    partial/<key>.json      the validator (ETag, URL) the partial bytes came from
    refs/<key>.json         source as written -> sha256 and resolved location
    locks/<key>.lock        file locks, so two processes do not fetch the same thing twice
    tmp/                    unique temp files while copying a file in

A blob enters only by rename, after its bytes were hashed (while written)
and matched the expected sha256; so a reader never sees a partial blob.
Before a blob is used its hash is checked through the stat-keyed hash cache:
a truncated or rewritten blob changes its stat signature, is re-hashed,
found wrong, removed, and fetched again. Locks only avoid duplicate work;
correctness never depends on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from loraforge.atomic import fsync_folder, open_new, remove_stale, write_text_atomic
from loraforge.canonical import canonical_json
from loraforge.errors import ResolveError
from loraforge.resolve import hash_cache
from loraforge.resolve.progress import FetchProgress, NoProgress
from loraforge.resolve.stream_hash import StreamHashes

COPY_CHUNK = 4 << 20


@dataclass(frozen=True)
class Blob:
    sha256: str
    path: Path
    size: int
    data_sha256: str | None


def store_root() -> Path:
    return hash_cache.cache_root() / "store"


def source_key(identity: str) -> str:
    """A file-name-safe key for anything identified by a string (a URL, a source)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else store_root()

    # --- blobs ---------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def get(self, sha256: str) -> Blob | None:
        """The blob with this hash if present and intact; a damaged one is removed."""
        path = self.blob_path(sha256)
        if not path.is_file():
            return None
        actual, data = hash_cache.cached_file_hashes(path)
        if actual != sha256:
            self._discard(path)  # truncated or altered in place: never use it, fetch again
            return None
        return Blob(sha256, path, path.stat().st_size, data)

    def blobs(self) -> Iterator[Path]:
        """Every blob file, in sorted order."""
        base = self.root / "blobs" / "sha256"
        if base.is_dir():
            yield from sorted(p for p in base.glob("??/*") if p.is_file() and len(p.name) == 64)

    def remove(self, sha256: str) -> None:
        self._discard(self.blob_path(sha256))

    def commit(self, temp: Path, hashes: StreamHashes, expected: str | None, name: str) -> Blob:
        """Move a fully written temp file into the store if its hash is the expected one."""
        if expected is not None and hashes.sha256 != expected:
            self._discard(temp)
            raise ResolveError(
                f"Input '{name}': the downloaded file has sha256 {hashes.sha256}, but {expected} is "
                "expected (from the recipe's `sha256:` or the lock file). Nothing was stored. Either the "
                "source now serves different bytes (check the source and update the pin, e.g. with "
                "`loraforge lock`) or the pin is wrong."
            )
        if expected is None:  # nothing vouches for these bytes: at least they must be a model file
            self._check_content(temp, name)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        target = self.blob_path(hashes.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.stat(temp).st_nlink == 1:  # not a hard link to someone else's file (the Hub cache's)
            os.chmod(temp, 0o444)  # blobs are immutable; a stray write should fail loudly
        os.replace(temp, target)
        _fsync_dir(target.parent)
        hash_cache.remember(target, hashes.sha256, hashes.data_sha256)
        return Blob(hashes.sha256, target, hashes.size, hashes.data_sha256)

    def _check_content(self, temp: Path, name: str) -> None:
        """Refuse (and delete) a download that is neither a valid safetensors file nor a pickle.

        An unpinned source that answers with an HTML login or error page
        would otherwise be stored for good and served to every later build.
        Pickles pass: the planner refuses or converts them with its own message.
        """
        from loraforge.errors import FormatError
        from loraforge.formats.safetensors_reader import open_safetensors
        from loraforge.formats.sniff import pickle_kind, read_head

        head, size = read_head(temp)
        if pickle_kind(head, size):
            return
        try:
            with open_safetensors(temp):
                return
        except FormatError as error:
            reason = str(error).replace(str(temp), "the file")
        self._discard(temp)
        shown = head[:16].decode("latin-1").encode("unicode_escape").decode()
        raise ResolveError(
            f"Input '{name}': the downloaded file ({size:,} bytes, starting with '{shown}') is not a safetensors "
            f"file ({reason.rstrip('.')}); often an error or login page answered instead of the file. Nothing was "
            "stored. Check the source (does it need a token or a login?) and run the command again; pin its sha256 "
            "(`sha256:` in the recipe) to have any other answer refused. A wrong file stored earlier is replaced by "
            "`loraforge lock`, which fetches unpinned sources anew."
        )

    def ingest_file(self, source: Path, expected: str | None, name: str, progress: FetchProgress = NoProgress()) -> Blob:
        """Copy (or hard-link) a local file into the store, hashing it on the way."""
        temp = self.temp_path()
        total = source.stat().st_size
        hashes = StreamHashes()
        progress.start(name, total)
        try:
            try:
                os.link(source, temp)  # same file system: no copy, just hash it
                reader, writer = open(temp, "rb"), None
            except OSError:
                writer = open_new(temp)  # O_EXCL: never written through a link planted at the temp name
                reader = open(source, "rb")
            with reader:
                while chunk := reader.read(COPY_CHUNK):
                    hashes.update(chunk)
                    if writer is not None:
                        writer.write(chunk)
                    progress.advance(name, len(chunk))
            if writer is not None:
                writer.close()
            return self.commit(temp, hashes, expected, name)
        except BaseException:
            self._discard(temp)
            raise
        finally:
            progress.finish(name)

    def temp_path(self) -> Path:
        folder = self.root / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder)  # copies of killed runs
        # Unique (never shared between processes) and named with its owner's pid (loraforge/atomic.py).
        return folder / f".blob.tmp-{os.getpid()}-{uuid.uuid4().hex[:16]}"

    # --- partial downloads, refs and locks -------------------------------------

    def partial_path(self, key: str) -> Path:
        folder = self.root / "partial"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}.part"

    @contextmanager
    def locked(self, key: str):
        """Hold the store lock for ``key`` (one fetch of one thing at a time)."""
        folder = self.root / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / f"{key}.lock")):
            yield

    def read_ref(self, source: str) -> dict | None:
        try:
            ref = json.loads((self.root / "refs" / f"{source_key(source)}.json").read_text())
        except (OSError, ValueError):
            return None
        return ref if isinstance(ref, dict) and ref.get("source") == source else None

    def write_ref(self, source: str, record: dict) -> None:
        folder = self.root / "refs"
        folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(folder / f"{source_key(source)}.json", {**record, "source": source})

    def refs(self) -> list[dict]:
        folder = self.root / "refs"
        found = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            try:
                ref = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(ref, dict) and isinstance(ref.get("sha256"), str):
                found.append({**ref, "_file": path})
        return found

    def _discard(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _write_json_atomically(path: Path, value: dict) -> None:
    write_text_atomic(path, canonical_json(value, indent=1) + "\n")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: the blob is in place either way
        fsync_folder(folder)

