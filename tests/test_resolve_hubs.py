"""hf:// and civitai:/AIR sources against hub-shaped endpoints served on 127.0.0.1.

HF_ENDPOINT and LORAFORGE_CIVITAI_BASE point the real code paths (huggingface_hub
for hf://, our https client for Civitai) at the local server.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import ResolveError
from loraforge.resolve.store import Store
from resolve_helpers import data_sha, fast_http, safetensors_bytes, server, sha, write_recipe  # noqa: F401

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CKPT = safetensors_bytes(20_000, seed=5)
LORA = safetensors_bytes(5_000, seed=6)
EXTRA = safetensors_bytes(3_000, seed=7)


@pytest.fixture
def hubs(server, fast_http, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("LORAFORGE_CIVITAI_BASE", server.base)
    server.add_hf_file("acme/tiny-sd", "main", COMMIT, "unet/model.safetensors", CKPT)
    server.add_civitai_version(222, 111, [(9001, "style.safetensors", LORA, True), (9002, "extra.safetensors", EXTRA, False)], token="s3cret")
    return server


def _lock(folder):
    return json.loads((folder / "recipe.lock").read_text())


def test_lock_pins_hf_commit_and_civitai_file_without_downloading(hubs, fast_http, monkeypatch):
    monkeypatch.setenv("CIVITAI_API_TOKEN", "s3cret")
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors", "style": "civitai:222"})
    first = runner.invoke(app, ["lock", str(recipe), "-q"])
    assert first.exit_code == 0, first.output
    text = (fast_http / "recipe.lock").read_text()
    lock = json.loads(text)
    assert lock["inputs"]["base"] == {
        "source": "hf://acme/tiny-sd@main/unet/model.safetensors",
        "resolved": {"repo": "acme/tiny-sd", "revision": "main", "commit": COMMIT, "path": "unet/model.safetensors"},
        "sha256": sha(CKPT),
        "size": len(CKPT),
    }
    assert lock["inputs"]["style"]["sha256"] == sha(LORA)
    assert lock["inputs"]["style"]["resolved"] == {
        "model": "111", "model_version": "222", "file_id": "9001", "file_name": "style.safetensors",
        "url": hubs.url("/api/download/models/222"),
    }
    assert "s3cret" not in text
    assert list(Store().blobs()) == []  # both sources told their sha256: nothing downloaded
    assert all(r.method == "HEAD" or "/api/v1/" in r.path for r in hubs.log)
    # Byte-identical on a second run.
    assert runner.invoke(app, ["lock", str(recipe), "-q"]).exit_code == 0
    assert (fast_http / "recipe.lock").read_text() == text


def test_fetch_downloads_through_the_hub_client_and_the_civitai_api_with_bearer_token(hubs, fast_http, monkeypatch):
    monkeypatch.setenv("CIVITAI_API_TOKEN", "s3cret")
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors", "style": "civitai:222"})
    result = runner.invoke(app, ["fetch", str(recipe), "-q", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["input"]: r for r in json.loads(result.output)["inputs"]}
    assert rows["base"]["sha256"] == sha(CKPT) and rows["style"]["sha256"] == sha(LORA)
    assert Store().get(sha(CKPT)).data_sha256 == data_sha(CKPT)
    assert Store().get(sha(LORA)).path.read_bytes() == LORA
    downloads = hubs.requests("/api/download/models/222")
    assert [r.authorization for r in downloads] == ["Bearer s3cret"]
    storage = hubs.requests(f"/storage/{sha(LORA)}")
    assert [r.authorization for r in storage] == [None]  # not forwarded to the storage host (another origin)
    assert [r.method for r in hubs.requests(f"/acme/tiny-sd/resolve/{COMMIT}/unet/model.safetensors")][-1] == "GET"


def test_civitai_without_token_says_which_variable_to_set(hubs, fast_http):
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors", "style": "civitai:222"})
    result = runner.invoke(app, ["fetch", str(recipe), "-q"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "HTTP 401" in text and "CIVITAI_API_TOKEN" in text and "'style'" in text


def test_air_urn_with_file_id_and_without_version(hubs, fast_http, monkeypatch):
    monkeypatch.setenv("CIVITAI_API_TOKEN", "s3cret")
    recipe = write_recipe(fast_http, {
        "base": "urn:air:sd1:lora:civitai:111@222+9002",
        "style": "urn:air:sd1:lora:civitai:111",  # newest version, pinned by the lock
    })
    result = runner.invoke(app, ["lock", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    lock = _lock(fast_http)
    assert (lock["inputs"]["base"]["sha256"], lock["inputs"]["base"]["resolved"]["file_id"]) == (sha(EXTRA), "9002")
    assert (lock["inputs"]["style"]["sha256"], lock["inputs"]["style"]["resolved"]["model_version"]) == (sha(LORA), "222")
    fetched = runner.invoke(app, ["fetch", str(recipe), "-q"])
    assert fetched.exit_code == 0, fetched.output
    assert Store().get(sha(EXTRA)).path.read_bytes() == EXTRA


def test_hub_serving_bytes_that_do_not_match_its_own_sha256_is_refused(server, fast_http, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    server.add_hf_file("acme/bad", "main", COMMIT, "x.safetensors", CKPT, lfs_sha256=sha(LORA))
    recipe = write_recipe(fast_http, {"base": "hf://acme/bad/x.safetensors", "style": "hf://acme/bad/x.safetensors"})
    result = runner.invoke(app, ["fetch", str(recipe), "base", "-q"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert sha(LORA) in text and sha(CKPT) in text and "'base'" in text
    assert list(Store().blobs()) == []


def test_hf_missing_file_and_repo_errors(server, fast_http, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    server.routes["/acme/gone/resolve/main/x.safetensors"] = 404
    recipe = write_recipe(fast_http, {"base": "hf://acme/gone/x.safetensors", "style": "hf://acme/gone/x.safetensors"})
    result = runner.invoke(app, ["fetch", str(recipe), "base", "-q"])
    assert result.exit_code == 2 and "'base'" in result.output and "hf://acme/gone/x.safetensors" in result.output


def test_offline_uses_the_store_after_fetch_and_names_what_is_missing_before(hubs, fast_http, monkeypatch):
    monkeypatch.setenv("CIVITAI_API_TOKEN", "s3cret")
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors", "style": "civitai:222"})
    empty = runner.invoke(app, ["build", str(recipe), "--offline", "-q"])
    assert empty.exit_code == 2
    text = " ".join(empty.output.split())
    assert "input 'base'" in text and "input 'style'" in text and "--offline" in text and "loraforge fetch" in text
    assert hubs.log == []  # not a single request
    assert runner.invoke(app, ["fetch", str(recipe), "-q"]).exit_code == 0
    count = len(hubs.log)
    again = runner.invoke(app, ["fetch", str(recipe), "-q", "--json"])
    rows = {r["input"]: r for r in json.loads(again.output)["inputs"]}
    assert {r["status"] for r in rows.values()} == {"store"} and len(hubs.log) == count


@pytest.mark.parametrize("module_name", ["httpx", "httpx2"])
def test_a_network_failure_under_the_hub_client_is_a_clear_error(module_name):
    """huggingface_hub 2.x raises httpx2 transport errors, which are not OSErrors (no traceback offline)."""
    from loraforge.recipe.sources import SourceRef
    from loraforge.resolve.sources.hf import _hub_errors

    client = pytest.importorskip(module_name)
    with pytest.raises(ResolveError) as caught:
        with _hub_errors("base", SourceRef(raw="hf://a/b@main/m.safetensors", scheme="hf")):
            raise client.ConnectError("[Errno 111] Connection refused")
    message = str(caught.value)
    assert "Input 'base' (hf://a/b@main/m.safetensors): cannot reach" in message and "ConnectError" in message
    assert "--offline" in message
