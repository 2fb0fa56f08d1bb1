"""Validating, streaming reader for .safetensors files.

The file is opened once and its header is checked completely before anything
in it is trusted: the size limit, the JSON, every entry, and that the tensors'
byte ranges tile the data section exactly (the same rule safetensors itself
enforces). Tensors are then read one at a time with a single read each, so
memory holds only the tensor asked for. See docs/safetensors.md.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import FormatError
from loraforge.formats import dtypes
from loraforge.formats.sniff import HEAD_BYTES, pickle_kind, pickle_refusal

# Largest JSON header accepted; the same limit safetensors uses.
MAX_HEADER_SIZE = 100_000_000
LENGTH_PREFIX = 8
MAX_ELEMENTS = 2**63  # torch sizes are int64: no dimension or element count may reach this
METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = ("data_offsets", "dtype", "shape")

if sys.byteorder != "little":  # pragma: no cover - no such machine in CI
    raise ImportError("loraforge reads safetensors (little-endian) only on little-endian machines")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file; start/end are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Validated headers by (file size, header bytes): at most MEMO_HEADERS of at most MEMO_HEADER_BYTES each.
MEMO_HEADERS = 16
MEMO_HEADER_BYTES = 8 << 20
_VALIDATED_HEADERS: OrderedDict[tuple[int, bytes], tuple[dict[str, str], dict[str, TensorInfo]]] = OrderedDict()
_VALIDATED_LOCK = threading.Lock()


class SafetensorsFile:
    """An open, validated .safetensors file. Use :func:`open_safetensors`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._handle = _open_regular(self.path)
        self._lock = threading.Lock()
        try:
            self.file_size = os.fstat(self._handle.fileno()).st_size
            self.header_size, self.metadata, self._infos = self._load_header()
        except FormatError:
            # A pickle is the commonest wrong file; say so, and why it is refused.
            kind = pickle_kind(self._head(), self.file_size, self.path.name)
            self._handle.close()
            if kind is not None:
                raise FormatError(pickle_refusal(self.path, kind)) from None
            raise
        except BaseException:
            self._handle.close()
            raise
        self._names = [info.name for info in sorted(self._infos.values(), key=_data_order)]

    # ---- header validation -------------------------------------------------

    def _fail(self, problem: str, fix: str) -> FormatError:
        return FormatError(f"{self.path} is not a valid safetensors file: {problem}. {fix}")

    def _load_header(self) -> tuple[int, dict[str, str], dict[str, TensorInfo]]:
        header_length = self._read_header_length()
        header_bytes = self._read_exact_at(LENGTH_PREFIX, header_length)
        header_size = LENGTH_PREFIX + header_length
        # Validation is a pure function of the header's bytes and the file's size, so a header seen before (planning
        # opens each base and adapter several times per target) is not parsed and checked again; the bytes are
        # always read from this file, so a changed file is never answered from the memo.
        key = (self.file_size, header_bytes)
        with _VALIDATED_LOCK:
            known = _VALIDATED_HEADERS.get(key)
            if known is not None:
                _VALIDATED_HEADERS.move_to_end(key)
        if known is not None:
            return header_size, dict(known[0]), dict(known[1])
        header = self._parse_header_json(header_bytes)
        metadata = self._check_metadata(header.pop(METADATA_KEY, {}))
        infos = {name: self._check_entry(name, entry, header_size) for name, entry in header.items()}
        self._check_tiling(infos, header_size)
        if header_length <= MEMO_HEADER_BYTES:
            with _VALIDATED_LOCK:
                _VALIDATED_HEADERS[key] = (dict(metadata), dict(infos))
                while len(_VALIDATED_HEADERS) > MEMO_HEADERS:
                    _VALIDATED_HEADERS.popitem(last=False)
        return header_size, metadata, infos

    def _read_header_length(self) -> int:
        if self.file_size < LENGTH_PREFIX:
            raise self._fail(
                f"it is {self.file_size} bytes long, shorter than the 8-byte header length",
                "The file is empty or truncated; re-download or rebuild it.",
            )
        header_length = int.from_bytes(self._read_exact_at(0, LENGTH_PREFIX), "little")
        if header_length > MAX_HEADER_SIZE:
            raise self._fail(
                f"its header claims {header_length} bytes, more than the {MAX_HEADER_SIZE}-byte limit",
                "The file is corrupt or not a safetensors file; re-download or rebuild it.",
            )
        if header_length > self.file_size - LENGTH_PREFIX:
            raise self._fail(
                f"its header claims {header_length} bytes but only {self.file_size - LENGTH_PREFIX} "
                "bytes follow the length prefix",
                f"The file is truncated at {self.file_size} bytes or is not a safetensors file; re-download it.",
            )
        return header_length

    def _parse_header_json(self, raw: bytes) -> dict[str, Any]:
        fix = "The header is corrupt; re-download or rebuild the file."
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise self._fail(f"its header is not valid UTF-8 (byte {error.start})", fix) from None
        try:
            header = json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
        except _DuplicateKey as duplicate:
            raise self._fail(
                f"its header names {duplicate.key!r} twice",
                "Only one entry per name is allowed; rebuild the file with unique tensor names.",
            ) from None
        except ValueError as error:
            raise self._fail(f"its header is not valid JSON ({error})", fix) from None
        if not isinstance(header, dict):
            raise self._fail(f"its header is a JSON {type(header).__name__}, not an object", fix)
        return header

    def _check_metadata(self, metadata: Any) -> dict[str, str]:
        if not isinstance(metadata, dict):
            raise self._fail(
                f"its {METADATA_KEY} is a JSON {type(metadata).__name__}, not an object of strings",
                "Rewrite the metadata as string keys with string values.",
            )
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise self._fail(
                    f"metadata key {key!r} holds a {type(value).__name__}, not a string",
                    "safetensors metadata values must be strings (encode structured values as JSON text).",
                )
        return dict(metadata)

    def _check_entry(self, name: str, entry: Any, header_size: int) -> TensorInfo:
        def bad(problem: str, fix: str = "The header is corrupt; re-download or rebuild the file.") -> FormatError:
            return self._fail(f"tensor {name!r} {problem}", fix)

        if not isinstance(entry, dict) or sorted(entry) != list(_ENTRY_FIELDS):
            raise bad("must be an object with exactly the fields dtype, shape and data_offsets")
        code = entry["dtype"]
        if not dtypes.is_known_code(code):
            raise bad(
                f"has dtype {code!r}, which loraforge does not support",
                f"Supported dtypes: {', '.join(dtypes.DTYPE_CODES)}; convert the file to one of them.",
            )
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"has shape {shape!r}; a shape must be a list of non-negative integers")
        # torch sizes are signed 64-bit; [0, 2**63] holds no bytes yet cannot be built (found by fuzzing).
        if any(d >= MAX_ELEMENTS for d in shape) or math.prod(d for d in shape if d) >= MAX_ELEMENTS:
            raise bad(f"has shape {shape}, larger than any tensor can be (2**63 elements)")
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise bad(f"has data_offsets {offsets!r}; they must be two non-negative integers [begin, end]")
        begin, end = offsets
        if begin > end:
            raise bad(f"has data_offsets [{begin}, {end}] that end before they begin")
        expected = math.prod(shape) * dtypes.itemsize(code)
        if end - begin != expected:
            raise bad(
                f"has shape {shape} of {code}, which is {expected} bytes, but its data_offsets span {end - begin} bytes"
            )
        return TensorInfo(name, code, tuple(shape), header_size + begin, header_size + end)

    def _check_tiling(self, infos: dict[str, TensorInfo], header_size: int) -> None:
        """The byte ranges must cover the data section exactly, in order, without gaps or overlaps."""
        data_size = self.file_size - header_size
        position = header_size
        for info in sorted(infos.values(), key=_data_order):
            if info.start != position:
                problem = "overlaps the tensor before it" if info.start < position else "leaves a gap before it"
                raise self._fail(
                    f"tensor {info.name!r} starts at data offset {info.start - header_size}, expected "
                    f"{position - header_size}: it {problem}",
                    "The header is corrupt; re-download or rebuild the file.",
                )
            position = info.end
        declared = position - header_size
        if declared > data_size:
            cut = next(info for info in sorted(infos.values(), key=_data_order) if info.end > self.file_size)
            raise self._fail(
                f"its header declares {declared} bytes of tensor data but the file holds {data_size} "
                f"(tensor {cut.name!r} is the first that does not fit)",
                f"The file is truncated at {self.file_size} of {position} bytes; re-download it.",
            )
        if declared < data_size:
            raise self._fail(
                f"it has {data_size - declared} bytes after the last tensor that no tensor owns",
                "Trailing data is refused (as safetensors does); re-download the file or rebuild it.",
            )

    def _head(self) -> bytes:
        return self._read_exact_at(0, min(HEAD_BYTES, self.file_size))

    # ---- raw reads ---------------------------------------------------------

    def _read_exact_into(self, offset: int, view: memoryview) -> None:
        with self._lock:
            self._handle.seek(offset)
            done = 0
            while done < len(view):
                count = self._handle.readinto(view[done:])
                if not count:
                    raise FormatError(
                        f"{self.path} ended at byte {offset + done} while reading {len(view)} bytes at offset "
                        f"{offset}; the file was truncated or changed while open. Re-download or rebuild it."
                    )
                done += count

    def _read_exact_at(self, offset: int, length: int) -> bytes:
        # One read() builds the bytes object directly (no second copy); a short
        # read (EOF, signal, the 2 GiB per-call cap on Linux) takes the loop.
        with self._lock:
            self._handle.seek(offset)
            data = self._handle.read(length)
        if len(data) == length:
            return data
        buffer = bytearray(length)
        self._read_exact_into(offset, memoryview(buffer))
        return bytes(buffer)

    # ---- public API --------------------------------------------------------

    def names(self) -> list[str]:
        """Tensor names in the order their bytes appear in the file."""
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor named {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def read_bytes(self, name: str) -> bytes:
        """The tensor's raw little-endian bytes, exactly as stored."""
        info = self.info(name)
        return self._read_exact_at(info.start, info.nbytes)

    def iter_bytes(self, name: str, chunk_size: int = 8 << 20):
        """The tensor's raw bytes in chunks of at most chunk_size (for copying huge tensors)."""
        info = self.info(name)
        for offset in range(info.start, info.end, chunk_size):
            yield self._read_exact_at(offset, min(chunk_size, info.end - offset))

    def read(self, name: str) -> torch.Tensor:
        """The tensor on the CPU, backed by one buffer holding exactly its bytes."""
        info = self.info(name)
        dtype = dtypes.torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        buffer = bytearray(info.nbytes)
        self._read_exact_into(info.start, memoryview(buffer))
        return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)

    def close(self) -> None:
        self._handle.close()

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"


def _data_order(info: TensorInfo) -> tuple[int, int, str]:
    # Zero-length tensors can share an offset; the name makes the order total.
    return (info.start, info.end, info.name)


def _open_regular(path: Path):
    """``path`` open for reading, if it is a regular file (a named pipe would block, a device never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # O_NONBLOCK: opening a FIFO must not wait
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file; check the path.") from None
    except IsADirectoryError:
        raise FormatError(f"{path} is a directory, not a .safetensors file; check the path.") from None
    except OSError as error:
        raise FormatError(f"{path} cannot be opened ({error.strerror or error}); check its permissions.") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise FormatError(f"{path} is a directory, not a .safetensors file; check the path.")
        raise FormatError(
            f"{path} is not a regular file (a named pipe, a device or a socket); loraforge reads only "
            ".safetensors files stored on disk."
        )
    return os.fdopen(fd, "rb", buffering=0)


def open_safetensors(path: str | os.PathLike[str]) -> SafetensorsFile:
    """Open and validate a .safetensors file; raises FormatError if it is malformed."""
    return SafetensorsFile(path)
