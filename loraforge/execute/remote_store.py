"""A content-addressed store every Ray worker can reach, named by an fsspec URL (``--store``, ``LORAFORGE_STORE``).

For a cluster whose workers do not see the driver's files: before a target
is submitted the driver uploads each file it reads (an input, a producer's
output) under its sha256, unless the store has it; a worker that cannot see
the driver's path fetches it by sha256 into its own local store (verified on
the way), writes its output to a local folder, uploads it under its sha256,
and the driver downloads it into the target's output path (atomically,
verified against the sha256 the worker reported). The driver alone writes
the lock.

Layout under the URL: ``blobs/sha256/ab/ab12…``, the layout of the local
store (resolve/store.py). ``file://`` URLs (a shared filesystem) write a
temp name and rename; object stores (``s3://``, ``gs://``, through fsspec's
s3fs / gcsfs) make an object visible only once its upload completed, so a
reader never sees part of one. fsspec is imported only when a store is used.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.atomic import atomic_file, commit, create_temp, discard
from loraforge.errors import BuildError
from loraforge.resolve.stream_hash import StreamHashes

CHUNK = 8 << 20
STORE_ENV = "LORAFORGE_STORE"


def store_url(option: str | None) -> str | None:
    """The store URL: ``--store``, else ``$LORAFORGE_STORE``, else None (workers share the driver's filesystem)."""
    return option or os.environ.get(STORE_ENV) or None


@dataclass(frozen=True)
class RemoteStore:
    url: str
    _fs: list = field(default_factory=list, compare=False, repr=False)  # (filesystem, root), made on first use

    def __getstate__(self):
        return {"url": self.url}  # the filesystem object is made again where it is used

    def __setstate__(self, state):
        object.__setattr__(self, "url", state["url"])
        object.__setattr__(self, "_fs", [])

    # --- where things are ----------------------------------------------------

    def _filesystem(self):
        if not self._fs:
            try:
                import fsspec

                fs, root = fsspec.core.url_to_fs(self.url)
            except ImportError as error:  # e.g. s3:// without s3fs
                raise BuildError(
                    f"the store {self.url} needs a Python package that is not installed ({error}). Install fsspec's "
                    "driver for it on the driver and on every worker (s3:// needs s3fs, gs:// needs gcsfs), or use a "
                    "file:// URL on a filesystem every node mounts."
                ) from None
            except (ValueError, OSError) as error:
                raise BuildError(f"the store URL {self.url!r} cannot be used: {error}. Give an fsspec URL such as "
                                 "file:///shared/loraforge-store, s3://bucket/prefix or gs://bucket/prefix.") from None
            self._fs.append((fs, root.rstrip("/")))
        return self._fs[0]

    def key(self, sha256: str) -> str:
        return f"{self._filesystem()[1]}/blobs/sha256/{sha256[:2]}/{sha256}"

    def _local(self) -> bool:
        protocol = self._filesystem()[0].protocol
        return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))

    # --- blobs ---------------------------------------------------------------

    def has(self, sha256: str, size: int) -> bool:
        fs, _root = self._filesystem()
        try:
            return fs.info(self.key(sha256)).get("size") == size
        except FileNotFoundError:
            return False
        except OSError as error:
            raise self._error("looking up", sha256, error) from None

    def upload(self, path: Path, sha256: str) -> bool:
        """Put ``path`` (whose sha256 the caller verified) under its hash; False when the store had it."""
        size = Path(path).stat().st_size
        if self.has(sha256, size):
            return False
        fs, _root = self._filesystem()
        key = self.key(sha256)
        try:
            fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
            if self._local():  # a shared filesystem: the one temp-then-rename helper (O_EXCL, no link followed)
                with open(path, "rb") as source, atomic_file(Path(key)) as handle:
                    shutil.copyfileobj(source, handle, CHUNK)
            else:  # object stores: an object appears only once its upload completed
                fs.put_file(str(path), key)
        except OSError as error:
            raise self._error("uploading", sha256, error) from None
        return True

    def download(self, sha256: str, destination: Path, what: str) -> int:
        """Write the blob to ``destination`` atomically, checking its sha256 on the way; returns its size.
        ``what`` names the file in errors (an input, a target's output)."""
        temp, handle = create_temp(Path(destination))
        try:
            hashes = self._copy_blob(sha256, handle, what, f"; nothing was written to {destination}")
            commit(temp, handle, Path(destination))
        except FileNotFoundError:
            discard(temp, handle)
            raise BuildError(f"{what}: the store {self.url} has no blob sha256 {sha256[:16]}…; it should have been "
                             "uploaded before. Check that every node uses the same store URL, then build again.") from None
        except OSError as error:
            discard(temp, handle)
            raise self._error("downloading", sha256, error) from None
        except BaseException:
            discard(temp, handle)
            raise
        return hashes.size

    def fetch_into_local_store(self, sha256: str, what: str) -> Path:
        """The blob as a file of this machine's content-addressed store (resolve/store.py), fetched if absent."""
        from loraforge.resolve.store import Store

        local = Store()
        blob = local.get(sha256)
        if blob is not None:
            return blob.path
        with local.locked(f"remote-{sha256[:32]}"):
            blob = local.get(sha256)
            if blob is not None:
                return blob.path
            temp, handle = create_temp(local.temp_path())  # O_EXCL, never through a planted link (atomic.py)
            try:
                with handle:
                    hashes = self._copy_blob(sha256, handle, what, "")
                return local.commit(temp, hashes, sha256, what).path
            except FileNotFoundError:
                raise BuildError(f"{what}: the store {self.url} has no blob sha256 {sha256[:16]}…; the driver uploads "
                                 "every file a target reads before submitting it. Check that every node uses the same "
                                 "store URL, then build again.") from None
            except OSError as error:
                raise self._error("downloading", sha256, error) from None
            finally:
                Path(temp).unlink(missing_ok=True)

    def _copy_blob(self, sha256: str, handle, what: str, nothing_written: str) -> StreamHashes:
        """Stream the blob into the open ``handle``, hashing it; BuildError when it is not the blob named."""
        fs, _root = self._filesystem()
        hashes = StreamHashes()
        with fs.open(self.key(sha256), "rb") as source:
            while chunk := source.read(CHUNK):
                hashes.update(chunk)
                handle.write(chunk)
        if hashes.sha256 != sha256:
            raise BuildError(
                f"{what}: the store {self.url} holds other bytes under sha256 {sha256[:16]}… (they hash to "
                f"{hashes.sha256[:16]}…){nothing_written}. Remove that blob from the store (it is damaged) and build again."
            )
        return hashes

    def _error(self, doing: str, sha256: str, error: OSError) -> BuildError:
        return BuildError(f"{doing} sha256 {sha256[:16]}… in the store {self.url} failed: {error}. Check that the store "
                          "is reachable from this machine with the credentials fsspec uses, and that it has space.")
