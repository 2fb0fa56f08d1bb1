"""The stat-keyed hash cache returns true hashes and notices changed files."""

import hashlib
import os

import loraforge.resolve.hash_cache as hash_cache


def test_cache_reuses_hash_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "input.bin"
    path.write_bytes(b"first version")
    calls = []
    real = hash_cache.file_hashes
    monkeypatch.setattr(hash_cache, "file_hashes", lambda p: calls.append(p) or real(p))

    assert hash_cache.cached_file_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    assert hash_cache.cached_file_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    assert len(calls) == 1  # the second answer came from the cache

    path.write_bytes(b"second version!")
    assert hash_cache.cached_file_sha256(path) == hashlib.sha256(b"second version!").hexdigest()
    assert len(calls) == 2

    stat = path.stat()  # same size, new mtime: hashed again
    path.write_bytes(b"second versioN!")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert hash_cache.cached_file_sha256(path) == hashlib.sha256(b"second versioN!").hexdigest()
    assert len(calls) == 3


def test_damaged_entry_and_disabled_cache_rehash(tmp_path, monkeypatch):
    path = tmp_path / "input.bin"
    path.write_bytes(b"data")
    expected = hashlib.sha256(b"data").hexdigest()
    assert hash_cache.cached_file_sha256(path) == expected
    for entry in (hash_cache.cache_root() / "hashes").glob("*.json"):
        entry.write_text("{not json")
    assert hash_cache.cached_file_sha256(path) == expected
    monkeypatch.setenv("LORAFORGE_HASH_CACHE", "0")
    calls = []
    real = hash_cache.file_hashes
    monkeypatch.setattr(hash_cache, "file_hashes", lambda p: calls.append(p) or real(p))
    assert hash_cache.cached_file_sha256(path) == expected and len(calls) == 1
