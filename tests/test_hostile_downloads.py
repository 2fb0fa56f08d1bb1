"""A LoRA download cut at every 10 % point: a clear refusal, no output, no store entry; the next build resumes.

Uses the real 127.0.0.1 server of loraforge.testing.http_server (no mock of
the HTTP layer). Retries are off so each cut ends the run.
"""

from __future__ import annotations

import hashlib

import pytest

from hostile import OUTPUT, assert_clear_refusal, make_project, run_cli, snapshot, write_models
from resolve_helpers import fast_http, server  # noqa: F401

from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.resolve.store import Store
from loraforge.testing.http_server import Blob


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference_output(tmp_path_factory, models) -> bytes:
    root = make_project(tmp_path_factory.mktemp("local"), models)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    return (root / OUTPUT).read_bytes()


def _project_with_remote_lora(folder, models, server, blob: Blob):
    data = (models / "style.safetensors").read_bytes()
    server.routes["/loras/style.safetensors"] = blob
    project = make_project(folder, models)
    recipe = project / "recipe.yaml"
    pinned = f"{{source: '{server.url('/loras/style.safetensors')}', sha256: {hashlib.sha256(data).hexdigest()}}}"
    recipe.write_text(recipe.read_text().replace("{source: models/style.safetensors}", pinned))
    return project, data


@pytest.mark.parametrize("percent", range(10, 100, 10))
def test_download_cut_at_each_tenth_fails_cleanly(server, fast_http, monkeypatch, models, percent):  # noqa: F811
    monkeypatch.setenv("LORAFORGE_HTTP_RETRIES", "0")
    data = (models / "style.safetensors").read_bytes()
    cut = len(data) * percent // 100
    project, _ = _project_with_remote_lora(fast_http / "project", models, server, Blob(data, drop_after=cut, drops=1))
    before = snapshot(project)
    assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"), ["'style'"])
    assert snapshot(project) == before  # no dist/, no temp file
    store = Store()
    assert list(store.blobs()) == []  # nothing half-downloaded is ever a store entry
    assert [p.stat().st_size for p in (store.root / "partial").glob("*.part")] == [cut]  # kept for resuming


def test_after_a_cut_the_next_build_resumes_and_matches_a_local_build(server, fast_http, monkeypatch, models, reference_output):  # noqa: F811
    monkeypatch.setenv("LORAFORGE_HTTP_RETRIES", "0")
    data = (models / "style.safetensors").read_bytes()
    cut = len(data) * 7 // 10
    project, _ = _project_with_remote_lora(fast_http / "project", models, server, Blob(data, drop_after=cut, drops=1))
    assert run_cli("build", project / "recipe.yaml", "-q")[0] == 2
    code, output = run_cli("build", project / "recipe.yaml", "-q")
    assert code == 0, output
    ranges = [g.range for g in server.requests("/loras/style.safetensors")]
    assert ranges == [None, f"bytes={cut}-"]
    # Same weights as a build from the local file (only the provenance differs: the source is a URL).
    reference = fast_http / "reference.safetensors"
    reference.write_bytes(reference_output)
    assert _tensor_bytes(project / OUTPUT) == _tensor_bytes(reference)


def _tensor_bytes(path) -> dict[str, bytes]:
    with open_safetensors(path) as file:
        return {name: file.read_bytes(name) for name in file.names()}
