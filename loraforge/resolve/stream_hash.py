"""Both hashes of a file computed from its bytes as they stream past.

A download is hashed while it is written (no second read of a 7 GB file):
the whole-file sha256, and the safetensors data-section sha256 (the bytes
after 8 + header length, see loraforge.formats.hashing), which is known only
once the first 8 bytes have gone by.
"""

from __future__ import annotations

import hashlib

_PREFIX = 8


class StreamHashes:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (the bytes are being written again from the start)."""
        self._whole = hashlib.sha256()
        self._data = hashlib.sha256()
        self._prefix = bytearray()
        self._data_start: int | None = None
        self.size = 0

    def update(self, chunk) -> None:
        view = memoryview(chunk)
        self._whole.update(view)
        if self._data_start is None:
            need = _PREFIX - len(self._prefix)
            self._prefix += view[:need]
            if len(self._prefix) == _PREFIX:
                self._data_start = _PREFIX + int.from_bytes(self._prefix, "little")
        if self._data_start is not None:
            skip = min(max(self._data_start - self.size, 0), len(view))
            self._data.update(view[skip:])
        self.size += len(view)

    @property
    def sha256(self) -> str:
        return self._whole.hexdigest()

    @property
    def data_sha256(self) -> str | None:
        """None when the bytes cannot be a safetensors file (too short for its header)."""
        if self._data_start is None or self._data_start > self.size:
            return None
        return self._data.hexdigest()
