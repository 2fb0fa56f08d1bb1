"""Every way a .safetensors header can lie is refused with a FormatError naming the file (and tensor)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from loraforge.errors import FormatError, LoraforgeError
from loraforge.formats.safetensors_reader import MAX_HEADER_SIZE, open_safetensors
from loraforge.formats.safetensors_writer import save_tensors


def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def raw_file(tmp_path, header, data: bytes = b"", name="bad.safetensors"):
    """A file with exactly this header (dict -> JSON, str/bytes verbatim) and data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def refused(path, *fragments):
    with pytest.raises(FormatError) as caught:
        open_safetensors(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(caught.value, LoraforgeError)
    return message


def test_valid_hand_written_file_is_accepted(tmp_path):
    path = raw_file(tmp_path, {"a": entry(), "b": entry("F16", (2,), (4, 8))}, b"\x00" * 8)
    with open_safetensors(path) as reader:
        assert reader.names() == ["a", "b"]
        assert reader.metadata == {}


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    refused(path, "3 bytes long", "re-download")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    refused(path, "0 bytes long")


def test_truncated_data(tmp_path):
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"a": torch.zeros(10), "b": torch.ones(10)})
    content = good.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(content[:-7])
    refused(path, f"truncated at {len(content) - 7} of {len(content)} bytes", "re-download", "tensor 'b'")


def test_truncated_header(tmp_path):
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"a": torch.zeros(10)})
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:30])
    refused(path, "only 22 bytes follow", "truncated at 30 bytes")


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b"{}")
    refused(path, "claims 5000 bytes")


def test_header_over_size_limit(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}")
    refused(path, f"{MAX_HEADER_SIZE + 1} bytes", "limit")


def test_invalid_json(tmp_path):
    refused(raw_file(tmp_path, '{"a": {"dtype": "F32",'), "not valid JSON")


def test_json_constants_refused(tmp_path):
    refused(raw_file(tmp_path, '{"__metadata__": {"x": NaN}}'), "not valid JSON")


def test_invalid_utf8(tmp_path):
    refused(raw_file(tmp_path, b'{"\xff\xfe": 1}'), "not valid UTF-8 (byte 2)")


def test_header_not_an_object(tmp_path):
    refused(raw_file(tmp_path, "[1, 2]"), "JSON list, not an object")


def test_overlapping_offsets(tmp_path):
    path = raw_file(tmp_path, {"a": entry(offsets=(0, 4)), "b": entry(offsets=(2, 6))}, b"\x00" * 6)
    refused(path, "'b'", "overlaps")


def test_gap_between_tensors(tmp_path):
    path = raw_file(tmp_path, {"a": entry(offsets=(0, 4)), "b": entry(offsets=(8, 12))}, b"\x00" * 12)
    refused(path, "'b'", "starts at data offset 8, expected 4", "gap")


def test_first_tensor_not_at_zero(tmp_path):
    path = raw_file(tmp_path, {"a": entry(offsets=(4, 8))}, b"\x00" * 8)
    refused(path, "'a'", "gap")


def test_end_before_begin(tmp_path):
    path = raw_file(tmp_path, {"a": entry(shape=(0,), offsets=(4, 0))}, b"\x00" * 4)
    refused(path, "'a'", "end before they begin")


def test_header_listed_out_of_data_order_is_fine(tmp_path):
    # safetensors sorts entries by offset before checking; so do we.
    path = raw_file(tmp_path, {"b": entry(offsets=(4, 8)), "a": entry(offsets=(0, 4))}, b"\x00" * 8)
    with open_safetensors(path) as reader:
        assert reader.names() == ["a", "b"]


def test_trailing_bytes_refused(tmp_path):
    path = raw_file(tmp_path, {"a": entry()}, b"\x00" * 4 + b"junk")
    refused(path, "4 bytes after the last tensor")


def test_unknown_dtype(tmp_path):
    refused(raw_file(tmp_path, {"a": entry(dtype="F4")}, b"\x00" * 4), "'a'", "dtype 'F4'", "BF16")


def test_dtype_not_a_string(tmp_path):
    refused(raw_file(tmp_path, {"a": entry(dtype=3)}, b"\x00" * 4), "'a'", "dtype 3")


def test_shape_length_mismatch(tmp_path):
    path = raw_file(tmp_path, {"a": entry(dtype="F32", shape=(2, 2), offsets=(0, 12))}, b"\x00" * 12)
    refused(path, "'a'", "16 bytes", "span 12 bytes")


@pytest.mark.parametrize("shape", [[-1], [2.0], [True], "3", [None]])
def test_invalid_shape(tmp_path, shape):
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    refused(raw_file(tmp_path, header, b"\x00" * 4), "'a'", "non-negative integers")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [-4, 0], [0.0, 4], "0,4"])
def test_invalid_offsets(tmp_path, offsets):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    refused(raw_file(tmp_path, header, b"\x00" * 4), "'a'", "data_offsets")


@pytest.mark.parametrize(
    "bad_entry",
    [
        {"dtype": "F32", "shape": [1]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1},
        [0, 4],
    ],
)
def test_entry_fields_exact(tmp_path, bad_entry):
    refused(raw_file(tmp_path, {"a": bad_entry}, b"\x00" * 4), "'a'", "exactly the fields")


def test_non_string_metadata_value(tmp_path):
    path = raw_file(tmp_path, {"__metadata__": {"ss_network_dim": 4}, "a": entry()}, b"\x00" * 4)
    refused(path, "'ss_network_dim'", "not a string")


def test_metadata_not_an_object(tmp_path):
    refused(raw_file(tmp_path, {"__metadata__": ["x"], "a": entry()}, b"\x00" * 4), "__metadata__")


def test_duplicate_tensor_names(tmp_path):
    text = '{"a": %s, "a": %s}' % (json.dumps(entry()), json.dumps(entry(offsets=(4, 8))))
    refused(raw_file(tmp_path, text, b"\x00" * 8), "'a' twice")


def test_duplicate_metadata_keys(tmp_path):
    text = '{"__metadata__": {"k": "1", "k": "2"}, "a": %s}' % json.dumps(entry())
    refused(raw_file(tmp_path, text, b"\x00" * 4), "'k' twice")


def test_memory_guard_huge_declared_tensor(tmp_path):
    # 4 TB declared, 4 bytes present: refused at open, before any read allocates.
    numel = 10**12
    path = raw_file(tmp_path, {"a": entry(shape=(numel,), offsets=(0, 4 * numel))}, b"\x00" * 4)
    refused(path, "declares 4000000000000 bytes of tensor data but the file holds 4")


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_safetensors(tmp_path / "absent.safetensors")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(FormatError, match="is a directory"):
        open_safetensors(tmp_path)


def test_file_truncated_after_open(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.zeros(100)})
    with open_safetensors(path) as reader:
        with open(path, "r+b") as handle:
            handle.truncate(reader.header_size + 10)
        with pytest.raises(FormatError, match="truncated or changed while open"):
            reader.read("a")
        with pytest.raises(FormatError, match="truncated or changed while open"):
            reader.read_bytes("a")


def test_zero_length_tensors_share_offsets(tmp_path):
    header = {"e1": entry(shape=(0,), offsets=(4, 4)), "a": entry(), "e0": entry(shape=(0, 3), offsets=(0, 0))}
    path = raw_file(tmp_path, header, b"\x00" * 4)
    with open_safetensors(path) as reader:
        assert reader.names() == ["e0", "a", "e1"]
        assert reader.read("e0").shape == (0, 3)


def test_leading_whitespace_and_space_padding_accepted(tmp_path):
    # safetensors accepts JSON whitespace around the object; its writer pads with spaces.
    path = raw_file(tmp_path, " " + json.dumps({"a": entry()}) + "   ", b"\x00" * 4)
    with open_safetensors(path) as reader:
        assert reader.names() == ["a"]
