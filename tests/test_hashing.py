"""File and data-section hashes against hashlib over the raw bytes."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from loraforge.errors import FormatError
from loraforge.formats import hashing
from loraforge.formats.hashing import autov2, autov3, data_sha256, file_hashes, file_sha256, modelspec_hash
from loraforge.formats.safetensors_writer import save_tensors


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.float16)}
    result = save_tensors(path, tensors, {"ss_network_dim": "4"})
    return path, result


def expected_hashes(path):
    content = path.read_bytes()
    header_length = struct.unpack("<Q", content[:8])[0]
    return hashlib.sha256(content).hexdigest(), hashlib.sha256(content[8 + header_length :]).hexdigest()


def test_hashes_equal_hashlib_and_writer(model):
    path, result = model
    whole, data = expected_hashes(path)
    assert file_sha256(path) == whole == result.sha256
    assert data_sha256(path) == data == result.data_sha256
    both = file_hashes(path)
    assert (both.sha256, both.data_sha256) == (whole, data)
    assert whole != data


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 4096])
def test_chunk_boundaries_do_not_matter(model, monkeypatch, chunk):
    # Small chunks make reads straddle the header/data boundary in every position.
    path, _ = model
    monkeypatch.setattr(hashing, "CHUNK_SIZE", chunk)
    whole, data = expected_hashes(path)
    assert file_sha256(path) == whole
    assert data_sha256(path) == data
    both = file_hashes(path)
    assert (both.sha256, both.data_sha256) == (whole, data)


def test_data_hash_ignores_metadata(tmp_path):
    tensors = {"w": torch.arange(12, dtype=torch.float16).reshape(3, 4)}
    first = save_tensors(tmp_path / "a.safetensors", tensors, {"modelspec.title": "one"})
    second = save_tensors(tmp_path / "b.safetensors", tensors, {"modelspec.title": "two, longer"})
    assert first.sha256 != second.sha256
    assert data_sha256(tmp_path / "a.safetensors") == data_sha256(tmp_path / "b.safetensors")


def test_derived_identifiers():
    digest = hashlib.sha256(b"loraforge").hexdigest()
    assert autov2(digest) == digest[:10] and len(autov2(digest)) == 10
    assert autov3(digest) == digest[:12]
    assert modelspec_hash(digest) == "0x" + digest and len(modelspec_hash(digest)) == 66
    both = hashing.FileHashes(digest, digest[::-1])
    assert both.autov2 == digest[:10]
    assert both.autov3 == digest[::-1][:12]
    assert both.modelspec == "0x" + digest[::-1]


def test_empty_data_section(tmp_path):
    path = tmp_path / "e.safetensors"
    save_tensors(path, {})
    assert data_sha256(path) == hashlib.sha256(b"").hexdigest()


def test_data_hash_of_short_file_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(FormatError, match=r"short\.safetensors is 2 bytes long"):
        data_sha256(path)
    assert file_sha256(path) == hashlib.sha256(b"\x00\x01").hexdigest()


def test_data_hash_with_header_beyond_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 99) + b"{}")
    with pytest.raises(FormatError, match=r"bad\.safetensors claims a 99-byte header"):
        file_hashes(path)
