"""Issue 17, Medium 7 and 8: download-side failures end in one paragraph and leave nothing in the store.

Real 127.0.0.1 servers; the disk-full case injects ENOSPC into the download's
file writes, the read-only case uses a cache path that cannot be a folder
(root ignores permission bits) and, where mounting works, a read-only tmpfs.
"""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
from pathlib import Path

import pytest

from hostile import assert_clear_refusal, make_project, run_cli, snapshot, write_models
from resolve_helpers import fast_http, server  # noqa: F401
from loraforge.resolve.store import Store
from loraforge.testing.http_server import Blob, Redirect

HTML = b"<!DOCTYPE html><html><body>Please log in</body></html>\n" * 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


def _remote_lora(folder, models, server, path="/loras/style.safetensors", pin=False):  # noqa: F811
    import hashlib

    data = (models / "style.safetensors").read_bytes()
    server.routes.setdefault(path, Blob(data))
    project = make_project(folder, models)
    pinned = f", sha256: {hashlib.sha256(data).hexdigest()}" if pin else ""
    recipe = project / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("{source: models/style.safetensors}", f"{{source: '{server.url(path)}'{pinned}}}"))
    return project


def _store_is_empty():
    store = Store()
    assert list(store.blobs()) == []
    leftovers = [p for p in store.root.rglob("*") if p.is_file() and p.parent.name in ("partial", "tmp", "sha256")]
    assert leftovers == []


def test_a_redirect_loop_is_one_paragraph(server, fast_http, models):  # noqa: F811
    server.routes["/loop"] = Redirect("/loop")
    project = _remote_lora(fast_http / "project", models, server, "/loop")
    before = snapshot(project)
    assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"), ["'style'", "redirect loop", "nothing was"])
    assert snapshot(project) == before
    _store_is_empty()


def test_a_login_page_for_an_unpinned_source_never_enters_the_store(server, fast_http, models):  # noqa: F811
    server.routes["/loras/style.safetensors"] = Blob(HTML)
    project = _remote_lora(fast_http / "project", models, server)
    before = snapshot(project)
    message = assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"),
                                   ["'style'", "not a safetensors file", "<!DOCTYPE html>", "Nothing was stored", "loraforge lock"])
    assert "login page" in message
    assert snapshot(project) == before
    _store_is_empty()
    # The server is fixed: the next build fetches the real file (nothing wrong was remembered).
    server.routes["/loras/style.safetensors"] = Blob((models / "style.safetensors").read_bytes())
    code, output = run_cli("build", project / "recipe.yaml", "-q")
    assert code == 0, output


class _FullDisk:
    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_a_full_disk_during_a_download_is_one_paragraph(server, fast_http, models, monkeypatch):  # noqa: F811
    project = _remote_lora(fast_http / "project", models, server, pin=True)
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _FullDisk(handle) if str(file).endswith(".part") and "a" in mode else handle

    monkeypatch.setattr("loraforge.resolve.http.open", full_open, raising=False)
    before = snapshot(project)
    code, output = run_cli("build", project / "recipe.yaml", "-q")
    # The test server's own thread may print a line about the dropped connection; the CLI's part follows.
    output = output[output.find("error:"):] if "error:" in output else output
    assert_clear_refusal(code, output, ["'style'", "No space left on device", "Nothing was stored"])
    assert snapshot(project) == before
    _store_is_empty()


def test_a_cache_that_cannot_be_written_is_one_paragraph(server, fast_http, models, monkeypatch):  # noqa: F811
    project = _remote_lora(fast_http / "project", models, server, pin=True)
    blocker = fast_http / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv("LORAFORGE_CACHE", str(blocker / "cache"))
    before = snapshot(project)
    assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"), ["'style'", "LORAFORGE_CACHE"])
    assert snapshot(project) == before and blocker.read_text() == "a file where the cache should be"


def test_a_read_only_cache_mount_is_one_paragraph(server, fast_http, models, monkeypatch):  # noqa: F811
    project = _remote_lora(fast_http / "project", models, server, pin=True)
    cache = fast_http / "ro-cache"
    cache.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(cache)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setenv("LORAFORGE_CACHE", str(cache))
        assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"), ["'style'", "Read-only file system"])
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)
