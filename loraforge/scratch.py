"""Scratch folders outside the recipe (``verify``'s rebuild in ``$TMPDIR``), named with their owner's pid.

``loraforge-verify-<pid>-<random>``: a `verify` that is killed (SIGKILL, a
crash of the machine) cannot remove its rebuild, which may be gigabytes. The
pid in the name says whose it is, so the next loraforge command (and
`loraforge cache gc`, which reports them) deletes those whose process is
gone, never a live one's (the same rule as loraforge/atomic.py's temp names).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from loraforge.atomic import _tree_size, owner_alive

VERIFY_PREFIX = "loraforge-verify-"
SCRATCH_PATTERN = re.compile(re.escape(VERIFY_PREFIX) + r"(?P<pid>[0-9]+)-[A-Za-z0-9_]+")


def make_scratch_folder() -> Path:
    """A new private folder for this process' rebuild (mode 0700, tempfile.mkdtemp), pid in its name."""
    return Path(tempfile.mkdtemp(prefix=f"{VERIFY_PREFIX}{os.getpid()}-")).resolve()


def stale_scratch_folders(folder: Path | None = None) -> list[Path]:
    """Scratch folders in ``folder`` (default: the temp folder) whose owner process is gone."""
    folder = Path(folder or tempfile.gettempdir())
    try:
        names = sorted(name for name in os.listdir(folder) if name.startswith(VERIFY_PREFIX))
    except OSError:
        return []
    found = []
    for name in names:
        match = SCRATCH_PATTERN.fullmatch(name)
        path = folder / name
        if match and not owner_alive(int(match["pid"])) and path.is_dir() and not path.is_symlink():
            found.append(path)
    return found


def remove_stale_scratch(folder: Path | None = None) -> list[tuple[Path, int]]:
    """Delete :func:`stale_scratch_folders`; (path, bytes freed) of each one removed. Errors are skipped."""
    removed = []
    for path in stale_scratch_folders(folder):
        size = _tree_size(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append((path, size))
    return removed
