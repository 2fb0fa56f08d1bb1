"""loraforge/atomic.py: the one way files are written (temp file, fsync, rename, folder fsync)."""

from __future__ import annotations

import os
import stat

import pytest

from loraforge import atomic
from loraforge.execute.prefetch import prefetched


def test_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    atomic.write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_text(path) as handle:
            handle.write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_symlink_at_the_destination_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "out.lock"
    path.symlink_to(victim)
    atomic.write_text_atomic(path, "lock")
    assert not path.is_symlink() and path.read_text() == "lock"
    assert victim.read_text() == "precious"


def test_temp_names_are_unique_and_never_follow_a_planted_link(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    names = iter(["planted", "planted", "fresh"])
    monkeypatch.setattr(atomic, "_temp_name", lambda p: p.with_name(f".{p.name}.tmp-{next(names)}"))
    (tmp_path / ".out.safetensors.tmp-planted").symlink_to(victim)
    temp, handle = atomic.create_temp(path)
    assert temp.name == ".out.safetensors.tmp-fresh"  # the taken name was skipped, not opened
    atomic.commit(temp, handle, path)
    assert victim.read_text() == "precious" and path.read_bytes() == b""


def test_temp_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic.write_text_atomic(tmp_path / "a", "x")
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o666 & ~umask
    folder = atomic.make_temp_folder(tmp_path / "bundle")
    assert folder.name.startswith(".bundle.tmp-") and stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert atomic.make_temp_folder(tmp_path / "bundle") != folder


def test_prefetched_keeps_order_and_reads_at_most_depth_ahead():
    loaded = []

    def load(item):
        loaded.append(item)
        return item * 10

    for item, value in prefetched(range(6), load, depth=2):
        assert value == item * 10
        assert len(loaded) <= item + 3  # this item and at most two more
    assert loaded == list(range(6))
