"""Hypothesis strategies and the oracle for fuzzing the safetensors reader.

Shared by tests/test_hostile_fuzz.py (bounded, every suite run) and
benchmarks/fuzz_reader.py (long runs). The oracle, for any file:

* opening it, reading every tensor, parsing it as an adapter and inspecting
  it either works or raises loraforge's FormatError, nothing else;
* while opening and reading, Python allocations peak below
  ``ALLOWANCE + GROWTH * file size`` (a declared size is never allocated
  before it is known to be in the file);
* whenever loraforge accepts a file, the reference ``safetensors`` library
  accepts it too and returns the same bytes for every tensor.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import torch
from hypothesis import strategies as st

from loraforge.errors import FormatError
from loraforge.formats.adapters import parse_adapter
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.inspect import inspect_file

from .safetensors_files import valid_bytes

ALLOWANCE = 512 * 1024
GROWTH = 64
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "U64", "Q7", ""]
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
NAMES = ["a", "b", "w", "lora_unet_x.lora_up.weight", "lora_unet_x.lora_down.weight", "lora_unet_x.alpha", "__metadata__", ""]

dimension = st.one_of(st.integers(0, 4), st.integers(-3, 2**70), st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64]))
shape = st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(dimension, max_size=4))
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


@st.composite
def structured_file(draw) -> bytes:
    """A header of plausible entries (offsets mostly consistent, sometimes not) and data of about the right size."""
    header: dict = {}
    offset = 0
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=5, unique=True)):
        dtype = draw(st.sampled_from(DTYPES))
        dims = draw(shape)
        size = ITEMSIZE.get(dtype, 1)
        for d in dims:
            size *= max(d, 0)
        size = min(size, 1 << 40)
        begin = draw(st.one_of(st.just(offset), st.integers(-2, 64), st.just(2**64 + 1)))
        end = draw(st.one_of(st.just(begin + size), st.integers(-2, 128)))
        entry = {"dtype": dtype, "shape": dims, "data_offsets": [begin, end]}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(st.one_of(json_value, st.just({**entry, "extra": 1}), st.just({"dtype": dtype})))
        header[name] = entry
        offset = end if isinstance(end, int) and 0 <= end < (1 << 16) else offset
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3), json_value))
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    data = bytes(draw(st.integers(0, 255)) for _ in range(0)) + b"\x01" * min(max(offset, 0), 4096)
    data = data[: len(data) + draw(st.integers(-3, 3))] if data else data
    length = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + text + data


@st.composite
def mutated_valid_file(draw, seeds: tuple[bytes, ...] = ()) -> bytes:
    """A valid file with a few bytes flipped, inserted, deleted or truncated."""
    data = bytearray(draw(st.sampled_from(seeds or (valid_bytes(),))))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[position] = draw(st.sampled_from(b'0123456789{}[]",:-e. \xff\x00'))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del data[position]
        else:
            del data[position:]
    return bytes(data)


def any_file(seeds: tuple[bytes, ...] = ()):
    return st.one_of(st.binary(max_size=256), structured_file(), mutated_valid_file(seeds))


def check_file(path: Path) -> None:
    """The oracle: only FormatError, bounded allocation, agreement with the reference library."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        accepted = _read_everything(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= ALLOWANCE + GROWTH * size, f"allocated {peak} bytes for a {size}-byte file"
    if accepted is not None:
        _agrees_with_safetensors(path, accepted)
        with open_safetensors(path) as file:
            try:
                parse_adapter(file)
            except FormatError:
                pass
    try:
        inspect_file(path)
    except FormatError:
        pass


def _read_everything(path: Path) -> dict[str, bytes] | None:
    try:
        with open_safetensors(path) as file:
            tensors = {}
            for name in file.names():
                tensors[name] = file.read_bytes(name)
                file.read(name)
            return tensors
    except FormatError:
        return None


def _agrees_with_safetensors(path: Path, accepted: dict[str, bytes]) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as reference:
        assert sorted(reference.keys()) == sorted(accepted)
        for name, raw in accepted.items():
            tensor = reference.get_tensor(name).reshape(-1)
            assert tensor.view(torch.uint8).numpy().tobytes() == raw, name
