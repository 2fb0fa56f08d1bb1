"""Broken .safetensors files: every way a header or a data section can lie.

Files are built byte by byte (``raw_file``) so each case is exactly the
defect it names and nothing else. Every one must be refused with a
FormatError whose message contains the case's fragments.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from . import Case

NAME = "broken.safetensors"


def entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def raw_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    """Length prefix + header + data; ``header`` is a dict (JSON), str or bytes; ``length`` overrides the prefix."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    prefix = len(header) if length is None else length
    return struct.pack("<Q", prefix) + header + data


def valid_bytes() -> bytes:
    """A small valid file: two F32 tensors and string metadata (the base the fuzzer mutates)."""
    header = {
        "__metadata__": {"format": "pt", "note": "corpus"},
        "a": entry("F32", (2, 2), (0, 16)),
        "b": entry("F16", (3,), (16, 22)),
    }
    return raw_bytes(header, bytes(range(22)))


def _writer(content: bytes):
    def make(folder: Path) -> Path:
        path = Path(folder) / NAME
        path.write_bytes(content)
        return path

    return make


def _case(content: bytes, *fragments: str, notes: str = "") -> Case:
    return Case(_writer(content), fragments, "FormatError", notes)


_ONE = {"a": entry()}
_HUGE = 10**12  # elements: 4 TB of F32, declared by a 100-byte file

CASES: dict[str, Case] = {
    "empty file": _case(b"", "0 bytes long"),
    "shorter than the length prefix": _case(b"\x10\x00\x00", "3 bytes long"),
    "header length 0": _case(struct.pack("<Q", 0), "not valid JSON"),
    "header length huge": _case(struct.pack("<Q", 2**63) + b"{}", "more than the 100000000-byte limit"),
    "header length beyond file": _case(raw_bytes(_ONE, b"\0" * 4, length=4096), "claims 4096 bytes"),
    "truncated header": _case(raw_bytes(_ONE, b"\0" * 4)[:20], "bytes follow the length prefix"),
    "truncated data": _case(raw_bytes({"a": entry(shape=(4,), offsets=(0, 16))}, b"\0" * 10), "truncated at"),
    "invalid utf-8": _case(raw_bytes(b'{"\xff\xfe": 1}'), "not valid UTF-8"),
    "invalid json": _case(raw_bytes('{"a": {"dtype": "F32",'), "not valid JSON"),
    "json NaN constant": _case(raw_bytes('{"__metadata__": {"x": NaN}}'), "NaN is not valid JSON"),
    "header is a list": _case(raw_bytes("[1, 2]"), "JSON list, not an object"),
    "duplicate tensor names": _case(
        raw_bytes('{"a": %s, "a": %s}' % (json.dumps(entry()), json.dumps(entry(offsets=(4, 8)))), b"\0" * 8),
        "names 'a' twice",
    ),
    "overlapping offsets": _case(
        raw_bytes({"a": entry(offsets=(0, 4)), "b": entry(offsets=(2, 6))}, b"\0" * 6), "overlaps the tensor before it"
    ),
    "offsets with a gap": _case(raw_bytes({"a": entry(offsets=(0, 4)), "b": entry(offsets=(8, 12))}, b"\0" * 12), "leaves a gap"),
    "offsets end before begin": _case(raw_bytes({"a": entry(offsets=(4, 0))}, b"\0" * 4), "end before they begin"),
    "offsets past end of file": _case(
        raw_bytes({"a": entry(offsets=(0, 4)), "b": entry(shape=(4,), offsets=(4, 20))}, b"\0" * 8), "'b' is the first that does not fit"
    ),
    "offsets beyond 64 bits": _case(raw_bytes({"a": entry(shape=(1,), offsets=(2**70, 2**70 + 4))}, b"\0" * 4), "starts at data offset"),
    "negative offset": _case(raw_bytes({"a": entry(offsets=(-4, 0))}, b"\0" * 4), "two non-negative integers"),
    "negative shape": _case(raw_bytes({"a": entry(shape=(-1,))}, b"\0" * 4), "non-negative integers"),
    "float shape": _case(raw_bytes({"a": entry(shape=(1.0,))}, b"\0" * 4), "non-negative integers"),
    "absurd shape, consistent offsets": _case(
        raw_bytes({"a": entry(shape=(_HUGE,), offsets=(0, 4 * _HUGE))}, b"\0" * 4),
        "declares 4000000000000 bytes of tensor data but the file holds 4",
        notes="the memory guard: refused at open, before any allocation",
    ),
    "absurd shape, small offsets": _case(raw_bytes({"a": entry(shape=(2**40, 2**40))}, b"\0" * 4), "larger than any tensor can be"),
    "large shape, small offsets": _case(raw_bytes({"a": entry(shape=(2**20, 2**20))}, b"\0" * 4), "but its data_offsets span 4 bytes"),
    "zero-size tensor with a 2**63 dimension": _case(
        raw_bytes({"a": entry("F64", (0, 2**63), (0, 0))}), "larger than any tensor can be",
        notes="found by the fuzzer: holds no bytes, but torch cannot build the shape",
    ),
    "unknown dtype": _case(raw_bytes({"a": entry(dtype="Q7")}, b"\0" * 4), "dtype 'Q7'", "Supported dtypes"),
    "dtype not a string": _case(raw_bytes({"a": entry(dtype=32)}, b"\0" * 4), "dtype 32"),
    "shape/length mismatch": _case(raw_bytes({"a": entry(shape=(2,), offsets=(0, 4))}, b"\0" * 4), "which is 8 bytes"),
    "entry with an extra field": _case(raw_bytes({"a": {**entry(), "extra": 1}}, b"\0" * 4), "exactly the fields"),
    "non-string metadata": _case(raw_bytes({"__metadata__": {"k": 1}, **_ONE}, b"\0" * 4), "metadata key 'k' holds a int"),
    "metadata not an object": _case(raw_bytes({"__metadata__": ["k"], **_ONE}, b"\0" * 4), "__metadata__ is a JSON list"),
    "trailing bytes": _case(raw_bytes(_ONE, b"\0" * 12), "8 bytes after the last tensor"),
    "pickle saved as .safetensors": _case(b"\x80\x02\x8a\x0alZ\xfc\x9cF\xf9 j\xa8P\x19." + b"\0" * 64, "is a Python pickle"),
    "zip saved as .safetensors": _case(b"PK\x03\x04" + b"\0" * 96, "a PyTorch checkpoint (a zip archive"),
}
