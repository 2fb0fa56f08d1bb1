"""Atomic file writes: a temp file in the target's folder, fsync, rename, fsync the folder.

Every file loraforge writes for a user (outputs, reports, lock files, store
entries, release bundles) goes through here, which prevents two failures:

- a crash, a full disk, Ctrl-C or SIGTERM in the middle of a write leaving a
  half-written file at the path: the bytes go to a temp file next to it,
  which is made durable (fsync) before one rename puts it in place, and the
  folder is fsynced so that the rename itself survives a power cut. A reader
  sees the old file or the new one, never a mixture; a failed write removes
  its temp file and leaves the old file as it was.
- a planted symlink redirecting the write: the temp file's name is unique and
  unpredictable and it is created with O_CREAT|O_EXCL|O_NOFOLLOW, so a link
  (or any file) already at that name makes the open fail instead of writing
  through it. The rename replaces a symlink at the destination itself rather
  than writing to where it points.

Files are created with mode 0o666 less the umask, like ``open(path, "w")``.

Leftovers of killed runs: SIGKILL (or a power cut) skips every cleanup, so
every temporary name says who made it: ``.<name>.tmp-<pid>-<16 hex>`` for
temp files and folders, ``.<name>.old-<pid>-<16 hex>`` for a release bundle
moved aside. :func:`stale_temporaries` finds those whose process is gone and
:func:`remove_stale` deletes them; loraforge runs it on the folders it writes
into, and ``loraforge cache gc`` reports what it removed in the cache.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


# A temporary name: `.<name>.<tmp|old>-<pid of its owner>-<16 random hex digits>`.
TEMP_PATTERN = re.compile(r"\..+\.(?:tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]{16}")


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    # `.tmp-` marks every temp file; tests look for leftovers by it. The pid says whose it is
    # (stale_temporaries); the random part makes the name unpredictable.
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(8)}")


def aside_name(path: Path) -> Path:
    """An unused, unpredictable name next to ``path`` to move it aside to (then delete it)."""
    return _temp_name(Path(path), "old")


def owner_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31  # someone else's process: not ours to judge
    except OSError:
        return True
    return True


def stale_temporaries(folder: Path) -> list[Path]:
    """Temp files and folders in ``folder`` (not below it) left by loraforge runs that are gone."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    found = []
    for name in names:
        match = TEMP_PATTERN.fullmatch(name)
        if match and not owner_alive(int(match["pid"])):
            found.append(Path(folder) / name)
    return found


def remove_stale(folder: Path) -> list[tuple[Path, int]]:
    """Delete :func:`stale_temporaries` of ``folder``; returns (path, bytes freed) of each one removed.

    Never follows a link: a symlink with such a name is removed itself. Errors
    (another process removing it first, a read-only folder) are skipped.
    """
    removed = []
    for path in stale_temporaries(folder):
        size = _tree_size(path)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append((path, size))
    return removed


def _tree_size(path: Path) -> int:
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())
    except OSError:
        return 0


def open_new(path: Path) -> IO:
    """``path`` created for writing (binary): FileExistsError if anything, a link included, is there already,
    so a planted symlink never redirects the write. For temp names chosen elsewhere (resolve/store.py)."""
    return os.fdopen(os.open(path, _FLAGS, 0o666), "wb")


def create_temp(path: Path, mode: str = "wb", **open_args) -> tuple[Path, IO]:
    """A new, empty temp file in ``path``'s folder, open for writing: (its path, the file object).

    OSError when the folder is missing or not writable. The caller either
    passes both to :func:`commit` or removes them with :func:`discard`.
    """
    path = Path(path)
    while True:
        temp = _temp_name(path)
        try:
            fd = os.open(temp, _FLAGS, 0o666)
        except FileExistsError:
            continue  # 64 random bits already taken: only a planted file can do that; pick another
        try:
            return temp, os.fdopen(fd, mode, **open_args)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise


def commit(temp: Path, handle: IO, path: Path) -> None:
    """Make the temp file durable and move it onto ``path`` (replacing what is there)."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(temp, path)
    fsync_folder(Path(path).parent)


def discard(temp: Path, handle: IO | None = None) -> None:
    """Close and delete a temp file that will not be committed."""
    if handle is not None:
        with contextlib.suppress(OSError):
            handle.close()
    Path(temp).unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable; skipped where a folder cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", **open_args) -> Iterator[IO]:
    """A file object whose contents appear at ``path`` only if the block succeeds."""
    temp, handle = create_temp(path, mode, **open_args)
    try:
        yield handle
    except BaseException:
        discard(temp, handle)
        raise
    try:
        commit(temp, handle, path)
    except BaseException:
        discard(temp, handle)
        raise


def atomic_text(path: Path) -> contextlib.AbstractContextManager[IO[str]]:
    """:func:`atomic_file` for UTF-8 text with LF line ends."""
    return atomic_file(path, "w", encoding="utf-8", newline="\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8, LF) atomically; OSError on failure, temp file removed."""
    with atomic_text(path) as handle:
        handle.write(text)


def make_temp_folder(path: Path) -> Path:
    """A new, empty folder next to ``path`` with a unique, unpredictable name (for building a
    folder that then replaces ``path`` by rename); mode 0o777 less the umask."""
    path = Path(path)
    while True:
        temp = _temp_name(path)
        try:
            temp.mkdir(mode=0o777)  # never follows a link: an existing name fails
            return temp
        except FileExistsError:
            continue
