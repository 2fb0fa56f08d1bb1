"""The streaming writer: plan enforcement, atomicity, hashes."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from loraforge.errors import BuildError
from loraforge.formats.hashing import file_hashes
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import (
    SafetensorsWriteError,
    SafetensorsWriter,
    TensorPlan,
    save_tensors,
)

PLAN = [TensorPlan("w", "F16", (2, 3)), TensorPlan("b", "F32", (3,)), TensorPlan("s", "I64", ())]
VALUES = {
    "w": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    "b": torch.tensor([0.5, -1.0, 2.0]),
    "s": torch.tensor(7),
}


def leftovers(directory) -> list[str]:
    return sorted(os.listdir(directory))


def write_all(writer: SafetensorsWriter) -> None:
    for item in PLAN:
        writer.write(item.name, VALUES[item.name])


def test_writes_plan_and_reports_true_hashes(tmp_path):
    path = tmp_path / "out.safetensors"
    with SafetensorsWriter(path, PLAN, {"b_key": "2", "a_key": "1"}) as writer:
        write_all(writer)
        result = writer.commit()
    content = path.read_bytes()
    header_size = 8 + int.from_bytes(content[:8], "little")
    assert result.path == path and result.size == len(content)
    assert result.sha256 == hashlib.sha256(content).hexdigest()
    assert result.data_sha256 == hashlib.sha256(content[header_size:]).hexdigest()
    hashes = file_hashes(path)
    assert (hashes.sha256, hashes.data_sha256) == (result.sha256, result.data_sha256)
    # The data section is the three tensors' little-endian bytes back to back.
    expected = b"".join(VALUES[i.name].numpy().tobytes() for i in PLAN)
    assert content[header_size:] == expected
    with open_safetensors(path) as reader:
        assert reader.names() == ["w", "b", "s"]
        assert reader.metadata == {"a_key": "1", "b_key": "2"}
        assert torch.equal(reader.read("w"), VALUES["w"])
    assert leftovers(tmp_path) == ["out.safetensors"]


def test_clean_exit_commits_and_exposes_result(tmp_path):
    path = tmp_path / "out.safetensors"
    with SafetensorsWriter(path, PLAN) as writer:
        write_all(writer)
    assert writer.result is not None and writer.result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_raw_bytes_and_parts_give_same_file(tmp_path):
    whole, parts = tmp_path / "whole.safetensors", tmp_path / "parts.safetensors"
    with SafetensorsWriter(whole, PLAN) as writer:
        write_all(writer)
    with SafetensorsWriter(parts, PLAN) as writer:
        flat = VALUES["w"].reshape(-1)
        writer.write_part("w", flat[:1])
        writer.write_part("w", flat[1:4].numpy().tobytes())
        writer.write_part("w", flat[4:])
        writer.write("b", VALUES["b"].numpy().tobytes())
        writer.write_part("s", VALUES["s"])
    assert whole.read_bytes() == parts.read_bytes()


def test_non_contiguous_tensor_is_written_in_c_order(tmp_path):
    path = tmp_path / "t.safetensors"
    transposed = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()
    save_tensors(path, {"t": transposed})
    with open_safetensors(path) as reader:
        assert torch.equal(reader.read("t"), transposed)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("b", VALUES["b"], "expects 'w' next"),
        ("w", VALUES["w"].float(), "is F32, the plan says F16"),
        ("w", VALUES["w"].reshape(3, 2), r"shape \(3, 2\), the plan says \(2, 3\)"),
        ("w", b"\x00" * 11, "got 11 bytes, the plan needs 12"),
    ],
)
def test_plan_violations_are_refused_and_leave_nothing(tmp_path, name, value, message):
    path = tmp_path / "out.safetensors"
    with pytest.raises(SafetensorsWriteError, match=message):
        with SafetensorsWriter(path, PLAN) as writer:
            writer.write(name, value)
    assert leftovers(tmp_path) == []


def test_too_many_parts_refused(tmp_path):
    with pytest.raises(SafetensorsWriteError, match="got 16 bytes, the plan needs 12"):
        with SafetensorsWriter(tmp_path / "o.safetensors", PLAN) as writer:
            writer.write_part("w", b"\x00" * 10)
            writer.write_part("w", b"\x00" * 6)
    assert leftovers(tmp_path) == []


def test_commit_with_missing_tensors_refused(tmp_path):
    writer = SafetensorsWriter(tmp_path / "o.safetensors", PLAN)
    writer.write("w", VALUES["w"])
    with pytest.raises(SafetensorsWriteError, match="2 planned tensors were not written.*'b'"):
        writer.commit()
    assert leftovers(tmp_path) == []


def test_write_beyond_plan_refused(tmp_path):
    with pytest.raises(SafetensorsWriteError, match="beyond the write plan"):
        with SafetensorsWriter(tmp_path / "o.safetensors", PLAN) as writer:
            write_all(writer)
            writer.write("extra", torch.zeros(1))
    assert leftovers(tmp_path) == []


def test_exception_mid_write_keeps_old_target_and_removes_temp(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"previous release")
    with pytest.raises(RuntimeError, match="interrupted"):
        with SafetensorsWriter(path, PLAN) as writer:
            writer.write("w", VALUES["w"])
            assert len(leftovers(tmp_path)) == 2  # target + temp file while writing
            raise RuntimeError("interrupted")
    assert leftovers(tmp_path) == ["out.safetensors"]
    assert path.read_bytes() == b"previous release"


def test_exception_mid_write_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(tmp_path / "out.safetensors", PLAN) as writer:
            writer.write("w", VALUES["w"])
            raise KeyboardInterrupt
    assert leftovers(tmp_path) == []


def test_dropped_writer_removes_temp_file(tmp_path):
    writer = SafetensorsWriter(tmp_path / "out.safetensors", PLAN)
    writer.write("w", VALUES["w"])
    del writer
    assert leftovers(tmp_path) == []


class FullDisk:
    """A file handle whose writes fail like a full disk."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_disk_full_is_a_build_error_and_leaves_nothing(tmp_path):
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, PLAN)
    writer._handle = FullDisk(writer._handle)
    with pytest.raises(BuildError, match=r"out\.safetensors failed: .*No space left"):
        writer.write("w", VALUES["w"])
    assert leftovers(tmp_path) == []


def test_missing_directory_is_a_build_error(tmp_path):
    with pytest.raises(BuildError, match="nowhere"):
        SafetensorsWriter(tmp_path / "nowhere" / "out.safetensors", PLAN)


def test_metadata_values_must_be_strings(tmp_path):
    with pytest.raises(SafetensorsWriteError, match="'ss_network_dim' maps to a int"):
        SafetensorsWriter(tmp_path / "o.safetensors", PLAN, {"ss_network_dim": 4})
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "plan, message",
    [
        ([TensorPlan("a", "F32", (1,)), TensorPlan("a", "F32", (1,))], "appears twice"),
        ([TensorPlan("__metadata__", "F32", (1,))], "invalid tensor name"),
        ([TensorPlan("a", "F4", (1,))], "unknown dtype 'F4'"),
        ([TensorPlan("a", "F32", (-1,))], "invalid shape"),
    ],
)
def test_invalid_plans_refused(tmp_path, plan, message):
    with pytest.raises(SafetensorsWriteError, match=message):
        SafetensorsWriter(tmp_path / "o.safetensors", plan)
    assert leftovers(tmp_path) == []


def test_two_writers_same_target_do_not_collide(tmp_path):
    path = tmp_path / "out.safetensors"
    first, second = SafetensorsWriter(path, PLAN), SafetensorsWriter(path, PLAN)
    write_all(first)
    write_all(second)
    first.commit()
    second.commit()
    assert leftovers(tmp_path) == ["out.safetensors"]


def test_same_input_same_bytes(tmp_path):
    a = save_tensors(tmp_path / "a.safetensors", VALUES, {"x": "1", "y": "2"})
    b = save_tensors(tmp_path / "b.safetensors", dict(reversed(VALUES.items())), {"y": "2", "x": "1"})
    assert a.sha256 == b.sha256


def test_large_pieces_hashed_on_worker_threads_match_hashlib(tmp_path):
    # 3 MiB and 1.5 MiB pieces take the threaded hashing path (>= PARALLEL_HASH_BYTES).
    big = torch.arange(3 << 18, dtype=torch.float32)
    plan = [TensorPlan("big", "F32", tuple(big.shape)), TensorPlan("tail", "F16", (3,))]
    path = tmp_path / "big.safetensors"
    with SafetensorsWriter(path, plan, {"k": "v"}) as writer:
        writer.write_part("big", big[: len(big) // 2])
        writer.write_part("big", big[len(big) // 2 :])
        writer.write("tail", torch.ones(3, dtype=torch.float16))
    content = path.read_bytes()
    header_size = 8 + int.from_bytes(content[:8], "little")
    assert writer.result.sha256 == hashlib.sha256(content).hexdigest()
    assert writer.result.data_sha256 == hashlib.sha256(content[header_size:]).hexdigest()


# ---- metadata that depends on the data (ModelSpec hash) --------------------

PLACEHOLDER = "0x" + "0" * 64


def test_deferred_metadata_filled_after_data(tmp_path):
    path = tmp_path / "out.safetensors"
    metadata = {"modelspec.hash_sha256": PLACEHOLDER, "modelspec.title": "t"}
    with SafetensorsWriter(path, PLAN, metadata) as writer:
        write_all(writer)
        result = writer.commit(deferred_metadata={"modelspec.hash_sha256": lambda data_sha: "0x" + data_sha})
    content = path.read_bytes()
    header_size = 8 + int.from_bytes(content[:8], "little")
    data_sha = hashlib.sha256(content[header_size:]).hexdigest()
    assert result.data_sha256 == data_sha
    assert result.sha256 == hashlib.sha256(content).hexdigest()
    with open_safetensors(path) as reader:
        assert reader.metadata == {"modelspec.hash_sha256": "0x" + data_sha, "modelspec.title": "t"}
    # Same bytes as writing the final value up front.
    final_metadata = {**metadata, "modelspec.hash_sha256": "0x" + data_sha}
    direct = save_tensors_in_plan_order(tmp_path / "direct.safetensors", final_metadata)
    assert direct.read_bytes() == content
    assert leftovers(tmp_path) == ["direct.safetensors", "out.safetensors"]


def save_tensors_in_plan_order(path, metadata):
    with SafetensorsWriter(path, PLAN, metadata) as writer:
        write_all(writer)
    return path


def test_deferred_metadata_needs_a_placeholder(tmp_path):
    writer = SafetensorsWriter(tmp_path / "out.safetensors", PLAN, {"other": "x"})
    write_all(writer)
    with pytest.raises(SafetensorsWriteError, match="placeholders"):
        writer.commit(deferred_metadata={"modelspec.hash_sha256": lambda data_sha: "0x" + data_sha})
    assert leftovers(tmp_path) == []


def test_deferred_metadata_must_keep_header_length(tmp_path):
    writer = SafetensorsWriter(tmp_path / "out.safetensors", PLAN, {"modelspec.hash_sha256": "0x0"})
    write_all(writer)
    with pytest.raises(SafetensorsWriteError, match="changed the header's length"):
        writer.commit(deferred_metadata={"modelspec.hash_sha256": lambda data_sha: "0x" + data_sha})
    assert leftovers(tmp_path) == []
