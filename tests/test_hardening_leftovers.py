"""Issue 17, Medium 4: temp files of killed runs are named with their owner's pid and removed by the next run.

One scheme everywhere (loraforge/atomic.py): ``.<name>.tmp-<pid>-<16 hex>``
(and ``.old-`` for a release moved aside). A later build deletes those in
the folders it writes to whose process is gone, never one of a live process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hostile import OUTPUT, make_project, run_cli, write_models
from loraforge import atomic
from loraforge.resolve.cache_admin import remove_stale_files, stale_files
from loraforge.resolve.store import Store


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_build_removes_temp_files_of_dead_runs_and_keeps_live_ones(tmp_path, models):
    root = make_project(tmp_path, models)
    dist = root / OUTPUT.parent
    dist.mkdir()
    dead, live = _dead_pid(), os.getppid()
    stale = dist / f".{OUTPUT.name}.tmp-{dead}-0123456789abcdef"
    stale.write_bytes(b"\0" * 4096)  # a killed bake's half-written output
    stale_folder = dist / f".pack.old-{dead}-0123456789abcdef"
    (stale_folder / "x").mkdir(parents=True)
    alive = dist / f".{OUTPUT.name}.tmp-{live}-fedcba9876543210"
    alive.write_bytes(b"busy")
    other = dist / ".notes.tmp-keep"  # not our scheme: never touched
    other.write_text("mine")
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    assert not stale.exists() and not stale_folder.exists()
    assert alive.read_bytes() == b"busy" and other.read_text() == "mine"


def test_temp_names_carry_the_owner_pid(tmp_path):
    temp, handle = atomic.create_temp(tmp_path / "out.safetensors")
    atomic.discard(temp, handle)
    match = atomic.TEMP_PATTERN.fullmatch(temp.name)
    assert match and int(match["pid"]) == os.getpid()
    assert atomic.TEMP_PATTERN.fullmatch(atomic.aside_name(tmp_path / "pack").name)


def test_store_temp_files_of_dead_runs_are_found_and_removed_for_cache_gc(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    store = Store()
    mine = store.temp_path()
    assert atomic.TEMP_PATTERN.fullmatch(mine.name)
    dead = store.root / "tmp" / f".blob.tmp-{_dead_pid()}-0123456789abcdef"
    dead.write_bytes(b"x" * 100)
    assert stale_files(store) == [dead]
    assert remove_stale_files(store) == [(dead, 100)]
    assert not dead.exists()
