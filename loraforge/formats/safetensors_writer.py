"""Streaming, atomic, reproducible .safetensors writer.

The whole header is known up front (names, dtypes and shapes come from a
plan), so it is written first and the tensors follow one at a time; nothing
but the tensor being written is ever in memory. Bytes go to a temporary file
next to the target while both the whole-file and the data-section sha256 are
computed; ``commit`` fsyncs and renames it into place, so the target path only
ever holds a complete file. See docs/safetensors.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch

from loraforge import atomic
from loraforge.errors import BuildError
from loraforge.formats import dtypes
from loraforge.formats.safetensors_reader import LENGTH_PREFIX, MAX_HEADER_SIZE, METADATA_KEY

BytesLike = Union[bytes, bytearray, memoryview]

# Pieces at least this large are hashed on two worker threads while the main
# thread writes them (hashlib and write() release the GIL), so hashing twice
# costs almost no wall time; smaller pieces are not worth the hand-off.
PARALLEL_HASH_BYTES = 1 << 20


class SafetensorsWriteError(ValueError):
    """The caller broke the plan (wrong order, dtype, shape, metadata type): a bug in the caller."""


@dataclass(frozen=True)
class TensorPlan:
    """One tensor the writer will receive, in file order."""

    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorPlan:
        return cls(name, dtypes.dtype_code(tensor.dtype), tuple(tensor.shape))


@dataclass(frozen=True)
class WriteResult:
    path: Path
    size: int
    sha256: str  # of the whole file
    data_sha256: str  # of the bytes after the header (kohya sshs_model_hash)


def encode_header(plan: Sequence[TensorPlan], metadata: Mapping[str, str] | None) -> bytes:
    """The header JSON: metadata first (keys sorted), tensors in plan order, space-padded to a multiple of 8."""
    _check_plan(plan)
    header: dict[str, object] = {}
    if metadata is not None:
        header[METADATA_KEY] = {key: metadata[key] for key in sorted(_checked_metadata(metadata))}
    offset = 0
    for item in plan:
        end = offset + item.nbytes
        header[item.name] = {"dtype": item.dtype, "shape": list(item.shape), "data_offsets": [offset, end]}
        offset = end
    try:
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SafetensorsWriteError(f"a tensor name or metadata string is not encodable as UTF-8: {error}") from None
    encoded += b" " * (-len(encoded) % 8)
    if len(encoded) > MAX_HEADER_SIZE:
        raise SafetensorsWriteError(
            f"the header would be {len(encoded)} bytes, over the {MAX_HEADER_SIZE}-byte limit readers enforce; "
            "store less metadata"
        )
    return len(encoded).to_bytes(LENGTH_PREFIX, "little") + encoded


def _checked_metadata(metadata: Mapping[str, str]) -> Mapping[str, str]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SafetensorsWriteError(
                f"safetensors metadata must map strings to strings, but {key!r} maps to a "
                f"{type(value).__name__}; convert the value with str() or json.dumps()"
            )
    return metadata


def _check_plan(plan: Sequence[TensorPlan]) -> None:
    seen: set[str] = set()
    for item in plan:
        if not isinstance(item.name, str) or not item.name or item.name == METADATA_KEY:
            raise SafetensorsWriteError(f"invalid tensor name {item.name!r} in the write plan")
        if item.name in seen:
            raise SafetensorsWriteError(f"tensor {item.name!r} appears twice in the write plan")
        seen.add(item.name)
        if not dtypes.is_known_code(item.dtype):
            raise SafetensorsWriteError(f"tensor {item.name!r} has unknown dtype {item.dtype!r} in the write plan")
        if not all(type(d) is int and d >= 0 for d in item.shape):
            raise SafetensorsWriteError(f"tensor {item.name!r} has invalid shape {item.shape!r} in the write plan")


def _load_fallocate():
    """libc's ``fallocate(fd, mode, offset, len)`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A view of the tensor's bytes in C order; copies only if the tensor is not already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Write a planned set of tensors to ``path``, atomically.

    Use as a context manager; leaving the block through an exception (or
    calling ``abort``) deletes the temporary file and leaves ``path`` untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        plan: Sequence[TensorPlan],
        metadata: Mapping[str, str] | None = None,
        deferred_keys: Sequence[str] = (),
    ):
        """``deferred_keys``: metadata keys whose values ``commit(deferred_metadata=...)`` fills in.

        Declaring them up front skips hashing the whole file while streaming,
        since the header (and so that hash) will change at commit anyway.
        """
        self.path = Path(path)
        self.plan = tuple(plan)
        self.metadata = dict(metadata) if metadata is not None else None
        header = encode_header(self.plan, metadata)
        self.header_size = len(header)
        self.size = self.header_size + sum(item.nbytes for item in self.plan)
        self._file_hash = hashlib.sha256()
        self._data_hash = hashlib.sha256()
        self._digests = (self._data_hash,) if deferred_keys else (self._file_hash, self._data_hash)
        self._index = 0  # plan position of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._result: WriteResult | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._temp_path, self._handle = self._open_temp()
        self._guarded(self._preallocate)
        self._guarded(self._emit_header, header)

    def _open_temp(self):
        """(temp path, binary file object): a new temp file next to the target (loraforge/atomic.py)."""
        atomic.remove_stale(self.path.parent)  # multi-GB temp files of killed runs into this folder
        try:
            return atomic.create_temp(self.path)
        except OSError as error:
            raise BuildError(
                f"cannot create a temporary file in {self.path.parent} to write {self.path.name}: {error}. "
                "Check that the directory exists and is writable."
            ) from None

    def _preallocate(self) -> None:
        """Reserve the file's final size on disk before writing (Linux ``fallocate``, where the file system has it).

        The size is known from the plan. Allocating it in one extent instead of
        page by page as writes arrive cut the kernel time of writing a 2 GiB
        output from 2-6 s to 0.5 s on ext4 here (docs/benchmarks.md), and a
        full disk fails now, before any work, instead of after it. Where the
        call is missing or unsupported nothing is reserved (no zero-filling
        emulation, which would write everything twice).
        """
        if self.size and _fallocate is not None:
            if _fallocate(self._handle.fileno(), 0, 0, self.size) != 0:
                code = ctypes.get_errno()
                if code == errno.ENOSPC:
                    raise OSError(code, f"{os.strerror(code)} (the output needs {self.size} bytes)")

    def _emit_header(self, header: bytes) -> None:
        self._handle.write(header)
        self._file_hash.update(header)

    def _emit(self, data: memoryview) -> None:
        if len(data) < PARALLEL_HASH_BYTES:
            self._handle.write(data)
            for digest in self._digests:
                digest.update(data)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="safetensors-hash")
        pending = [self._pool.submit(digest.update, data) for digest in self._digests]
        try:
            self._handle.write(data)
        finally:
            # The caller may reuse the buffer once we return: wait for both digests.
            for future in pending:
                future.result()

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _guarded(self, action, *args):
        """Run an I/O step; on an OS error remove the temp file and explain."""
        try:
            return action(*args)
        except OSError as error:
            self.abort()
            raise BuildError(
                f"writing {self.path} failed: {error}. Check free disk space and permissions, then build again; "
                "nothing was written at the target path."
            ) from error

    # ---- writing -----------------------------------------------------------

    def _expect(self, name: str) -> TensorPlan:
        if self._handle.closed:
            raise SafetensorsWriteError(f"the writer for {self.path} is already committed or aborted")
        if self._index >= len(self.plan):
            raise SafetensorsWriteError(f"{name!r} is beyond the write plan of {self.path}: every tensor is written")
        item = self.plan[self._index]
        if name != item.name:
            raise SafetensorsWriteError(
                f"{self.path}: got tensor {name!r} but the plan expects {item.name!r} next (position {self._index})"
            )
        return item

    def _as_bytes(self, item: TensorPlan, data: torch.Tensor | BytesLike, whole: bool) -> memoryview:
        if isinstance(data, torch.Tensor):
            code = dtypes.dtype_code(data.dtype)
            if code != item.dtype:
                raise SafetensorsWriteError(f"{self.path}: tensor {item.name!r} is {code}, the plan says {item.dtype}")
            if whole and tuple(data.shape) != item.shape:
                raise SafetensorsWriteError(
                    f"{self.path}: tensor {item.name!r} has shape {tuple(data.shape)}, the plan says {item.shape}"
                )
            return _tensor_bytes(data)
        return memoryview(data).cast("B")

    def write(self, name: str, data: torch.Tensor | BytesLike) -> None:
        """Write the whole next planned tensor (a tensor of the planned dtype and shape, or its raw bytes)."""
        item = self._expect(name)
        if self._written:
            raise SafetensorsWriteError(f"{self.path}: tensor {name!r} was started with write_part; finish it so")
        view = self._as_bytes(item, data, whole=True)
        if len(view) != item.nbytes:
            raise SafetensorsWriteError(
                f"{self.path}: tensor {name!r} got {len(view)} bytes, the plan needs {item.nbytes}"
            )
        self._guarded(self._emit, view)
        self._index += 1

    def write_part(self, name: str, data: torch.Tensor | BytesLike) -> None:
        """Append the next piece of the next planned tensor (C order); it is complete once all its bytes arrived."""
        item = self._expect(name)
        view = self._as_bytes(item, data, whole=False)
        if self._written + len(view) > item.nbytes:
            raise SafetensorsWriteError(
                f"{self.path}: tensor {name!r} got {self._written + len(view)} bytes, the plan needs {item.nbytes}"
            )
        self._guarded(self._emit, view)
        self._written += len(view)
        if self._written == item.nbytes:
            self._index += 1
            self._written = 0

    def _finish(self) -> None:
        self._stop_pool()
        atomic.commit(self._temp_path, self._handle, self.path)

    def commit(self, deferred_metadata: Mapping[str, Callable[[str], str]] | None = None) -> WriteResult:
        """Check every planned tensor was written, make the file durable and move it onto the target path.

        ``deferred_metadata`` fills metadata values that depend on the data
        (ModelSpec's ``hash_sha256``): each key maps to a function of the
        data-section sha256 whose result must have exactly the length of the
        placeholder given at construction, so the header keeps its size and is
        rewritten in place. The whole-file hash is then computed again from disk.
        """
        if self._result is not None:
            return self._result
        if self._handle.closed:
            raise SafetensorsWriteError(f"the writer for {self.path} was aborted; nothing to commit")
        if self._index < len(self.plan):
            missing = [item.name for item in self.plan[self._index :]]
            self.abort()
            raise SafetensorsWriteError(
                f"{self.path}: {len(missing)} planned tensors were not written (first: {missing[0]!r}); "
                "the file was discarded"
            )
        data_sha256 = self._data_hash.hexdigest()
        if deferred_metadata:
            header = self._final_header(deferred_metadata, data_sha256)
            self._guarded(self._rewrite_header, header)
        elif self._file_hash not in self._digests:
            self._guarded(self._rewrite_header, encode_header(self.plan, self.metadata))
        self._guarded(self._finish)
        self._result = WriteResult(self.path, self.size, self._file_hash.hexdigest(), data_sha256)
        return self._result

    def _final_header(self, deferred: Mapping[str, Callable[[str], str]], data_sha256: str) -> bytes:
        if self.metadata is None or not set(deferred) <= set(self.metadata):
            self.abort()
            raise SafetensorsWriteError(f"{self.path}: deferred metadata keys need placeholders in the metadata")
        filled = {**self.metadata, **{key: fill(data_sha256) for key, fill in deferred.items()}}
        header = encode_header(self.plan, filled)
        if len(header) != self.header_size:
            self.abort()
            raise SafetensorsWriteError(f"{self.path}: a deferred metadata value changed the header's length")
        return header

    def _rewrite_header(self, header: bytes) -> None:
        """Overwrite the header in place and hash the file again (the data is in the page cache).

        The flush to disk (fsync) runs on another thread meanwhile: one is
        disk-bound, the other CPU-bound, so together they cost about the longer.
        """
        self._handle.seek(0)
        self._handle.write(header)
        self._handle.flush()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-fsync") as pool:
            flushed = pool.submit(os.fsync, self._handle.fileno())
            self._file_hash = hashlib.sha256(header)
            with open(self._temp_path, "rb") as reader:
                reader.seek(self.header_size)
                while chunk := reader.read(8 << 20):
                    self._file_hash.update(chunk)
            flushed.result()

    @property
    def result(self) -> WriteResult | None:
        """The committed file's result (None before commit)."""
        return self._result

    def abort(self) -> None:
        """Discard the temporary file; the target path is left as it was."""
        if self._result is not None:
            return
        self._stop_pool()
        if not self._handle.closed:
            self._handle.close()
        try:
            os.unlink(self._temp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif self._result is None:
            self.commit()

    def __del__(self) -> None:
        # A writer dropped without commit must not leave its temp file behind.
        handle = getattr(self, "_handle", None)
        if handle is not None and self._result is None:
            try:
                self.abort()
            except Exception:
                pass


def save_file_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The data order safetensors.save_file uses: by dtype rank (descending), then by name."""
    return sorted(tensors, key=lambda name: (-dtypes.save_file_rank(dtypes.dtype_code(tensors[name].dtype)), name))


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> WriteResult:
    """Write tensors in memory to a file, laid out exactly as safetensors.save_file lays them out."""
    order = save_file_order(tensors)
    plan = [TensorPlan.of(name, tensors[name]) for name in order]
    with SafetensorsWriter(path, plan, metadata) as writer:
        for name in order:
            writer.write(name, tensors[name])
        return writer.commit()
