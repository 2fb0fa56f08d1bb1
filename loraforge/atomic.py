"""Atomic small-file writes: temp file in the same folder, fsync, rename.

For text outputs (lock files, build reports): a reader never sees a half
written file, and a failed write leaves the previous file as it was.
Large tensor files use the streaming SafetensorsWriter instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8, LF) atomically; OSError on failure, temp file removed."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
