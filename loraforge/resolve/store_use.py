"""Who is using the store: builds share it, `loraforge cache gc` needs it alone.

A build (and every command that resolves or reads inputs: plan, fetch, lock,
verify, release, publish) holds a **shared** lock on
``<store>/locks/in-use.lock`` for as long as it runs; `cache gc` takes the
same lock **exclusively** and, when it cannot, refuses in one paragraph
instead of deleting blobs a running build is about to read. The locks are
``flock`` locks on an open file: the kernel drops them when the process
ends, however it ends, so a killed build never blocks gc.

Where the store cannot be written (a read-only cache) the shared lock is
skipped: nothing can then be collected either, and the command itself says
what is wrong with the cache when it needs it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from loraforge.errors import ResolveError

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no flock; gc then relies on its scope and confirmation)
    fcntl = None

LOCK_NAME = "in-use.lock"


def _open(root: Path) -> int | None:
    folder = Path(root) / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        return None


@contextlib.contextmanager
def store_in_use(root: Path) -> Iterator[None]:
    """Hold the store shared (any number of builds at once); waits while a gc runs (it is quick)."""
    fd = _open(root) if fcntl is not None else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:
                pass  # a filesystem without locks: go on unprotected rather than refuse to build
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def store_alone(root: Path) -> Iterator[None]:
    """Hold the store exclusively, or raise ResolveError at once when a build is using it."""
    fd = _open(root) if fcntl is not None else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ResolveError(
                    f"another loraforge command (a build, verify, fetch or plan) is using the store {root} right "
                    "now, and `cache gc` could delete a file it is about to read; nothing was removed. Run "
                    "`loraforge cache gc` again when it has finished."
                ) from None
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)
