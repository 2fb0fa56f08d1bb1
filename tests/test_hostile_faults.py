"""Faults during a build: disk full, an unwritable output folder, SIGTERM/SIGINT mid-write.

Each must end in one clear paragraph (or the interrupt notice), a non-zero
exit, no temporary file left behind, and the previous output intact.
Disk-full and read-only cases use a real small tmpfs when the tests run as
root (they skip otherwise) and an injected ENOSPC everywhere.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from slow_build import start_slow_build
from hostile import OUTPUT, RECIPE, assert_clear_refusal, make_project, run_cli, snapshot, write_models

from loraforge.formats import safetensors_writer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def previous_output(tmp_path_factory, models) -> bytes:
    root = make_project(tmp_path_factory.mktemp("good"), models)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    return (root / OUTPUT).read_bytes()


@pytest.fixture
def project(tmp_path, models, previous_output, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    return make_project(tmp_path / "project", models, previous_output)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp-*"))


@contextmanager
def tmpfs(mount_point: Path, options: str):
    """A real tmpfs at mount_point (needs root); skips the test when mounting is not possible."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _absolute_inputs(project: Path) -> str:
    return RECIPE.replace("models/", f"{project / 'models'}/")


# --- disk full --------------------------------------------------------------


def test_disk_full_on_a_real_small_filesystem(tmp_path, project, previous_output):
    with tmpfs(tmp_path / "small", "size=8m") as small:
        (small / "recipe.yaml").write_text(_absolute_inputs(project))
        (small / "dist").mkdir()
        (small / OUTPUT).write_bytes(previous_output)  # 5 MB used: the new 5 MB output cannot fit
        message = assert_clear_refusal(*run_cli("build", small / "recipe.yaml", "-q"), ["No space left on device"])
        assert "nothing was written at the target path" in message
        assert (small / OUTPUT).read_bytes() == previous_output
        assert temp_files(small) == []


class _FullDisk:
    """A file object that accepts ``budget`` bytes, then fails like a full disk."""

    def __init__(self, handle, budget: int):
        self._handle, self._budget = handle, budget

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)


@pytest.mark.parametrize("budget", [0, 100, 1 << 20, 4 << 20])
def test_disk_full_injected_at_several_points(project, tmp_path, previous_output, monkeypatch, budget):
    open_temp = safetensors_writer.SafetensorsWriter._open_temp

    def limited(self):
        temp, handle = open_temp(self)
        return temp, _FullDisk(handle, budget)

    monkeypatch.setattr(safetensors_writer.SafetensorsWriter, "_open_temp", limited)
    before = snapshot(project, tmp_path / "cache")
    assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"), ["No space left on device", "baked.safetensors"])
    assert snapshot(project, tmp_path / "cache") == before
    assert temp_files(project) == []


# --- output folder not writable ---------------------------------------------


def test_read_only_output_folder(project, tmp_path, previous_output):
    dist = project / OUTPUT.parent
    (dist / OUTPUT.name).unlink()
    if os.geteuid() == 0:  # root ignores permission bits: use a read-only mount instead
        context = tmpfs(dist, "size=1m,ro")
    else:
        dist.chmod(0o555)
        context = _nothing()
    with context:
        assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"), ["cannot create a temporary file", "writable"])
        assert list(dist.iterdir()) == []
    dist.chmod(0o755)


@contextmanager
def _nothing():
    yield


def test_output_folder_that_is_a_file(project):
    recipe = project / "recipe.yaml"
    recipe.write_text(recipe.read_text() + "    output: notes.txt/baked.safetensors\n")
    (project / "notes.txt").write_text("not a folder")
    assert_clear_refusal(*run_cli("build", recipe, "-q"), ["cannot create the output folder", "notes.txt", "not a file"])
    assert (project / "notes.txt").read_text() == "not a folder"


# --- signals ----------------------------------------------------------------



@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_build_leaves_the_previous_output_and_no_temp_file(project, tmp_path, previous_output, signum, exit_code):
    env = {**os.environ, "LORAFORGE_CACHE": str(tmp_path / "cache")}
    # the writer writes ~1100 tiny tensors: signal it at the 50th
    process = start_slow_build(project / "recipe.yaml", "count == 50", 0.005, env)
    try:
        line = process.stderr.readline()
        assert "MIDWAY" in line, line + process.stderr.read()
        assert temp_files(project), "the build should be writing its temp file now"
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == exit_code, stderr
    assert "interrupted: no partial output was left behind." in stderr and "Traceback" not in stderr
    assert (project / OUTPUT).read_bytes() == previous_output
    assert temp_files(project) == []


def test_an_error_raised_while_an_interrupt_unwinds_is_reported_as_the_interrupt():
    """Ctrl-C landing inside Condition.wait surfaces as RuntimeError('cannot release un-acquired lock')."""
    from loraforge.interrupts import Terminated, interruptions_kept

    with pytest.raises(Terminated):
        with interruptions_kept():
            try:
                raise Terminated()
            except KeyboardInterrupt:
                raise RuntimeError("cannot release un-acquired lock")
    with pytest.raises(RuntimeError):  # a plain error stays itself
        with interruptions_kept():
            raise RuntimeError("boom")
