"""The hashes model hubs and UIs use to identify .safetensors files.

- ``file_sha256``: sha256 of every byte. Identity in our cache and lock file,
  Hugging Face's LFS oid, Civitai "SHA256"; its first 10 hex are A1111/Civitai
  "AutoV2".
- ``data_sha256``: sha256 of the bytes after the header (after 8 + header
  length). kohya's ``sshs_model_hash``; its first 12 hex are the A1111 LoRA
  hash and Civitai "AutoV3". Unchanged by metadata edits.
- ``modelspec_hash``: ModelSpec ``modelspec.hash_sha256`` = "0x" + data hash.

Files are read in fixed-size chunks, never whole.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import FormatError

CHUNK_SIZE = 4 << 20  # 4 MiB: large enough for full disk speed, small enough for memory
_LENGTH_PREFIX = 8


@dataclass(frozen=True)
class FileHashes:
    sha256: str  # whole file
    data_sha256: str  # data section

    @property
    def autov2(self) -> str:
        return autov2(self.sha256)

    @property
    def autov3(self) -> str:
        return autov3(self.data_sha256)

    @property
    def modelspec(self) -> str:
        return modelspec_hash(self.data_sha256)


def _data_start(handle, path: Path) -> int:
    """Where the data section starts; only the length prefix is checked, not the JSON."""
    file_size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(_LENGTH_PREFIX)
    if len(prefix) < _LENGTH_PREFIX:
        raise FormatError(
            f"{path} is {file_size} bytes long, too short to be a safetensors file (it needs an 8-byte "
            "header length); re-download or rebuild it."
        )
    header_length = int.from_bytes(prefix, "little")
    if header_length > file_size - _LENGTH_PREFIX:
        raise FormatError(
            f"{path} claims a {header_length}-byte header but is only {file_size} bytes long, so it has no "
            "data section to hash; it is truncated or not a safetensors file. Re-download or rebuild it."
        )
    return _LENGTH_PREFIX + header_length


def _hash_from(handle, start: int, whole=None, data=None) -> None:
    """Feed the file from offset 0 to ``whole`` and from ``start`` to ``data``, chunk by chunk."""
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    position = 0 if whole is not None else start
    handle.seek(position)
    while count := handle.readinto(buffer):
        if whole is not None:
            whole.update(view[:count])
        if data is not None:
            skip = min(max(start - position, 0), count)
            data.update(view[skip:count])
        position += count


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        _hash_from(handle, 0, whole=digest)
    return digest.hexdigest()


def data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of the safetensors data section (kohya sshs_model_hash)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        _hash_from(handle, _data_start(handle, Path(path)), data=digest)
    return digest.hexdigest()


def file_hashes(path: str | os.PathLike[str]) -> FileHashes:
    """Both hashes in one pass over the file."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        _hash_from(handle, _data_start(handle, Path(path)), whole=whole, data=data)
    return FileHashes(whole.hexdigest(), data.hexdigest())


def autov2(sha256_hex: str) -> str:
    """A1111 / Civitai AutoV2: the first 10 hex of the whole-file sha256."""
    return sha256_hex[:10]


def autov3(data_sha256_hex: str) -> str:
    """A1111 LoRA hash / Civitai AutoV3: the first 12 hex of the data-section sha256."""
    return data_sha256_hex[:12]


def modelspec_hash(data_sha256_hex: str) -> str:
    """ModelSpec ``modelspec.hash_sha256``: "0x" + the data-section sha256."""
    return "0x" + data_sha256_hex
