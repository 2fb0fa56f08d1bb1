"""The content-addressed store: streaming hashes, verified commits, damaged blobs, local ingest."""

from __future__ import annotations

import os

import pytest

from loraforge.errors import ResolveError
from loraforge.formats.hashing import file_hashes
from loraforge.resolve.store import Store
from loraforge.resolve.stream_hash import StreamHashes
from resolve_helpers import data_sha, safetensors_bytes, sha


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 9, 64, 4096, 10**6])
def test_stream_hashes_match_whole_file_hashes_for_any_chunking(tmp_path, chunk):
    data = safetensors_bytes(600, seed=3)
    hashes = StreamHashes()
    for start in range(0, len(data), chunk):
        hashes.update(data[start:start + chunk])
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    reference = file_hashes(path)
    assert (hashes.sha256, hashes.data_sha256, hashes.size) == (reference.sha256, reference.data_sha256, len(data))
    assert hashes.data_sha256 == data_sha(data)


def test_stream_hashes_of_a_non_safetensors_file_have_no_data_hash():
    hashes = StreamHashes()
    hashes.update(b"\xff" * 20)  # header length far beyond the bytes
    assert hashes.sha256 == sha(b"\xff" * 20) and hashes.data_sha256 is None


def _commit(store: Store, data: bytes, expected: str | None):
    temp = store.temp_path()
    temp.write_bytes(data)
    hashes = StreamHashes()
    hashes.update(data)
    return store.commit(temp, hashes, expected, "lora")


def test_commit_verifies_and_stores_read_only_under_the_hash(tmp_path):
    store = Store(tmp_path / "store")
    data = safetensors_bytes(100)
    blob = _commit(store, data, sha(data))
    assert blob.path == store.blob_path(sha(data)) and blob.path.read_bytes() == data
    assert blob.data_sha256 == data_sha(data) and blob.size == len(data)
    assert not os.access(blob.path, os.W_OK) or os.geteuid() == 0
    assert oct(blob.path.stat().st_mode & 0o777) == oct(0o444)
    assert store.get(sha(data)).path == blob.path
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_wrong_hash_leaves_nothing_in_the_store(tmp_path):
    store = Store(tmp_path / "store")
    data = safetensors_bytes(100)
    wrong = "0" * 64
    with pytest.raises(ResolveError) as caught:
        _commit(store, data, wrong)
    message = str(caught.value)
    assert "'lora'" in message and wrong in message and sha(data) in message
    assert list(store.blobs()) == [] and list((tmp_path / "store" / "tmp").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "rewrite"])
def test_damaged_blob_is_detected_removed_and_never_used(tmp_path, damage):
    store = Store(tmp_path / "store")
    data = safetensors_bytes(100)
    blob = _commit(store, data, None)
    os.chmod(blob.path, 0o644)
    if damage == "truncate":
        with open(blob.path, "r+b") as handle:
            handle.truncate(len(data) // 2)
    else:
        stat = blob.path.stat()
        blob.path.write_bytes(data[:-1] + b"\x00")  # same size, different bytes
        os.utime(blob.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert store.get(sha(data)) is None
    assert not blob.path.exists()


def test_ingest_copies_or_links_a_local_file_and_verifies_it(tmp_path):
    store = Store(tmp_path / "store")
    source = tmp_path / "hub-blob"
    data = safetensors_bytes(300)
    source.write_bytes(data)
    blob = store.ingest_file(source, sha(data), "base")
    assert blob.path.read_bytes() == data and source.read_bytes() == data
    with pytest.raises(ResolveError, match="'base'"):
        store.ingest_file(source, "1" * 64, "base")
    assert [p.name for p in store.blobs()] == [sha(data)]


def test_ingest_never_writes_through_a_link_planted_at_its_temp_name(tmp_path, monkeypatch):
    """The copy path opens its temp file O_EXCL|O_NOFOLLOW: a symlink waiting at the name is refused, the
    file it points to keeps its bytes, and the planted link is removed."""
    store = Store(tmp_path / "store")
    source = tmp_path / "model.safetensors"
    data = safetensors_bytes(300)
    source.write_bytes(data)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    planted = store.temp_path()
    planted.symlink_to(victim)
    monkeypatch.setattr(Store, "temp_path", lambda self: planted)
    with pytest.raises(FileExistsError):
        store.ingest_file(source, sha(data), "model")
    assert victim.read_bytes() == b"keep me"
    assert not planted.is_symlink() and store.get(sha(data)) is None
