"""Issue 17, Medium 4 (rest) and 6: leftovers of killed runs are removed by the next command and
reported by `cache gc`; gc never runs while a build uses the store, and without a scope it asks.

verify's scratch rebuild is ``$TMPDIR/loraforge-verify-<pid>-<random>`` (loraforge/scratch.py);
builds hold a shared flock on ``<store>/locks/in-use.lock`` that gc takes exclusively
(resolve/store_use.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from hostile import make_project, run_cli, write_models
from slow_build import start_slow_build
from loraforge.resolve.store import Store
from loraforge.resolve.store_use import store_in_use


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    scratch_root = tmp_path / "tmpdir"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    return tmp_path / "cache"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftovers(dead: int):
    """A killed verify's rebuild and a killed copy into the store, of a dead process; the same of a live one."""
    scratch_root = tempfile.gettempdir()
    verify_dead = os.path.join(scratch_root, f"loraforge-verify-{dead}-k1ll3d")
    os.makedirs(os.path.join(verify_dead, "dist"))
    with open(os.path.join(verify_dead, "dist", "baked.safetensors"), "wb") as handle:
        handle.write(b"\0" * 3000)
    verify_live = os.path.join(scratch_root, f"loraforge-verify-{os.getppid()}-busy")
    os.makedirs(verify_live)
    tmp = Store().root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    blob_dead = tmp / f".blob.tmp-{dead}-0123456789abcdef"
    blob_dead.write_bytes(b"x" * 1000)
    return verify_dead, verify_live, blob_dead


def _blob(store: Store, data: bytes) -> str:
    """An unreferenced blob in the store (what gc removes)."""
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    path = store.blob_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def test_verify_rebuilds_in_a_folder_named_with_its_pid_and_removes_dead_ones(tmp_path, cache, models, monkeypatch):
    from loraforge.verify import run as verify_run

    root = make_project(tmp_path / "project", models)
    assert run_cli("build", root / "recipe.yaml", "-q")[0] == 0
    verify_dead, verify_live, _ = _leftovers(_dead_pid())
    made = []
    original = verify_run.make_scratch_folder
    monkeypatch.setattr(verify_run, "make_scratch_folder", lambda: made.append(original()) or made[-1])
    monkeypatch.setattr("loraforge.cli._tidy", lambda: None)  # verify itself must remove them
    code, output = run_cli("verify", root / "recipe.yaml", "-q")
    assert code == 0, output
    assert made and made[0].name.startswith(f"loraforge-verify-{os.getpid()}-") and not made[0].exists()
    assert not os.path.exists(verify_dead) and os.path.isdir(verify_live)


def test_every_command_removes_leftovers_of_dead_runs_at_startup(tmp_path, cache, models):
    root = make_project(tmp_path / "project", models)
    verify_dead, verify_live, blob_dead = _leftovers(_dead_pid())
    code, output = run_cli("plan", root / "recipe.yaml")
    assert code == 0, output
    assert not os.path.exists(verify_dead) and not blob_dead.exists()
    assert os.path.isdir(verify_live)


def test_cache_gc_reports_and_removes_leftovers_with_paths_and_bytes(tmp_path, cache):
    verify_dead, verify_live, blob_dead = _leftovers(_dead_pid())
    (tmp_path / "recipes").mkdir()
    code, output = run_cli("cache", "gc", tmp_path / "recipes", "--dry-run")
    assert code == 0, output
    assert f"would remove {verify_dead} 2.9 KiB" in output and f"would remove {blob_dead} 1000 B" in output
    assert os.path.exists(verify_dead) and blob_dead.exists()
    code, output = run_cli("cache", "gc", tmp_path / "recipes")
    assert code == 0, output
    assert f"removed {verify_dead} 2.9 KiB" in output and "removed 2 leftovers of killed runs (3.9 KiB)" in output
    assert not os.path.exists(verify_dead) and not blob_dead.exists() and os.path.isdir(verify_live)


def test_cache_gc_without_a_folder_asks_or_needs_all(tmp_path, cache, monkeypatch):
    store = Store()
    digest = _blob(store, b"someone else's download")
    monkeypatch.chdir(tmp_path)
    code, output = run_cli("cache", "gc")  # CliRunner's stdin is not a terminal
    assert code == 2 and "Traceback" not in output
    assert output.startswith("error: cache gc with no folder would remove 1 blobs") and "--all" in output
    assert output.count("\n\n") == 0 and store.blob_path(digest).exists()
    code, output = run_cli("cache", "gc", "--dry-run")
    assert code == 0 and f"would remove {digest}" in output and store.blob_path(digest).exists()
    code, output = run_cli("cache", "gc", "--all")
    assert code == 0 and f"removed {digest}" in output and not store.blob_path(digest).exists()


def test_cache_gc_asks_on_a_terminal(tmp_path, cache, monkeypatch):
    store = Store()
    digest = _blob(store, b"a download")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("loraforge.cli_resolve._interactive", lambda: True)
    from typer.testing import CliRunner

    from loraforge.cli import app

    result = CliRunner().invoke(app, ["cache", "gc"], input="n\n")
    assert result.exit_code == 0 and "nothing removed" in result.output and store.blob_path(digest).exists()
    result = CliRunner().invoke(app, ["cache", "gc"], input="y\n")
    assert result.exit_code == 0 and f"removed {digest}" in result.output and not store.blob_path(digest).exists()


def test_cache_gc_refuses_while_the_store_is_in_use(tmp_path, cache):
    store = Store()
    digest = _blob(store, b"needed by a build")
    (tmp_path / "recipes").mkdir()
    with store_in_use(store.root):
        code, output = run_cli("cache", "gc", tmp_path / "recipes")
    assert code == 2 and "Traceback" not in output
    assert output.startswith("error: another loraforge command (a build") and "nothing was removed" in output
    assert store.blob_path(digest).exists()
    code, output = run_cli("cache", "gc", tmp_path / "recipes")
    assert code == 0 and not store.blob_path(digest).exists()


def test_cache_gc_refuses_during_a_real_build(tmp_path, cache, models):
    root = make_project(tmp_path / "project", models)
    store = Store()
    digest = _blob(store, b"an unreferenced download")
    env = {**os.environ, "LORAFORGE_CACHE": str(cache)}
    process = start_slow_build(root / "recipe.yaml", "count == 20", 0.005, env)
    try:
        line = process.stderr.readline()
        assert "MIDWAY" in line, line + process.stderr.read()
        code, output = run_cli("cache", "gc", tmp_path / "project")
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert code == 2 and "is using the store" in output and store.blob_path(digest).exists()
    code, output = run_cli("cache", "gc", tmp_path / "project")
    assert code == 0, output
    assert not store.blob_path(digest).exists()
