"""Issue 17, High 2: tokens go only to the hosts they belong to.

A committed lock file, an API answer or a redirect must not steer
CIVITAI_API_TOKEN (or HF_TOKEN) anywhere else. Real servers on 127.0.0.1;
"localhost" on the same port is another origin, as an attacker's host is.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.resolve.sources.auth import civitai_auth, https_auth, token_allowed
from loraforge.testing.http_server import Blob, Redirect
from resolve_helpers import fast_http, safetensors_bytes, server, sha, write_recipe  # noqa: F401

runner = CliRunner()
TOKEN = "s3cret-civitai"
HF_SECRET = "hf_s3cret"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LORA = safetensors_bytes(5_000, seed=6)
CKPT = safetensors_bytes(20_000, seed=5)


def _elsewhere(server) -> str:
    return server.base.replace("127.0.0.1", "localhost")


def _authorizations(server, path):
    return [r.authorization for r in server.requests(path)]


@pytest.fixture
def civitai(server, fast_http, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LORAFORGE_CIVITAI_BASE", server.base)
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    server.add_hf_file("acme/tiny-sd", "main", COMMIT, "unet/model.safetensors", CKPT)
    server.add_civitai_version(222, 111, [(9001, "style.safetensors", LORA, True)], token=TOKEN)
    return server


def test_a_lock_naming_another_host_never_gets_the_civitai_token(civitai, fast_http):  # noqa: F811
    """The attack: a cloned repository commits a lock whose Civitai download URL is the attacker's."""
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors", "style": "civitai:222"})
    assert runner.invoke(app, ["lock", str(recipe), "-q"]).exit_code == 0
    lock = json.loads((fast_http / "recipe.lock").read_text())
    civitai.routes["/collect"] = Blob(LORA)  # serves the right bytes: the build would succeed unnoticed
    for url in (_elsewhere(civitai) + "/collect", civitai.base + "/collect"):
        civitai.log.clear()
        lock["inputs"]["style"]["resolved"]["url"] = url
        (fast_http / "recipe.lock").write_text(json.dumps(lock))
        result = runner.invoke(app, ["fetch", str(recipe), "-q"])
        assert "Traceback" not in result.output
        if url.startswith(civitai.base):  # the Civitai origin itself: its own token is fine there
            assert _authorizations(civitai, "/collect") == [f"Bearer {TOKEN}"]
        else:
            assert _authorizations(civitai, "/collect") == [None], url
        for path in ("/api/download/models/222",):
            assert all(a in (None, f"Bearer {TOKEN}") for a in _authorizations(civitai, path))
        from loraforge.resolve.store import Store

        for blob in list(Store().blobs()):
            blob.chmod(0o644)
            blob.unlink()  # the next URL must be fetched again


def test_an_api_answer_pointing_elsewhere_never_gets_the_token(civitai, fast_http):  # noqa: F811
    answer = civitai.routes["/api/v1/model-versions/222"]
    answer["files"][0]["downloadUrl"] = _elsewhere(civitai) + "/collect"
    civitai.routes["/collect"] = Blob(LORA)
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors", "style": "civitai:222"})
    result = runner.invoke(app, ["fetch", str(recipe), "style", "-q"])
    assert result.exit_code == 0, result.output
    assert _authorizations(civitai, "/collect") == [None]
    assert _authorizations(civitai, "/api/v1/model-versions/222") == [f"Bearer {TOKEN}"]  # the API itself: yes


def test_a_redirect_to_another_origin_drops_the_token(civitai, fast_http):  # noqa: F811
    civitai.routes["/api/download/models/222"] = Redirect(_elsewhere(civitai) + "/collect", 302)
    civitai.tokens.pop("/api/download/models/222", None)
    civitai.routes["/collect"] = Blob(LORA)
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors", "style": "civitai:222"})
    result = runner.invoke(app, ["fetch", str(recipe), "style", "-q"])
    assert result.exit_code == 0, result.output
    assert _authorizations(civitai, "/api/download/models/222") == [f"Bearer {TOKEN}"]
    assert _authorizations(civitai, "/collect") == [None]


def test_an_https_source_on_another_host_gets_no_token(civitai, fast_http):  # noqa: F811
    civitai.routes["/files/style.safetensors"] = Blob(LORA)
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors",
                                      "style": _elsewhere(civitai) + "/files/style.safetensors"})
    result = runner.invoke(app, ["fetch", str(recipe), "style", "-q"])
    assert result.exit_code == 0, result.output
    assert _authorizations(civitai, "/files/style.safetensors") == [None]


def test_hf_token_is_not_sent_where_the_hub_redirects_to_another_origin(civitai, fast_http, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    route = f"/acme/tiny-sd/resolve/{COMMIT}/unet/model.safetensors"
    headers = civitai.routes[route].headers
    civitai.routes["/cdn/model"] = Blob(CKPT)
    civitai.routes[route] = Redirect(_elsewhere(civitai) + "/cdn/model", 302)
    civitai.routes[f"/acme/tiny-sd/resolve/main/unet/model.safetensors"] = Blob(CKPT, headers=headers)
    recipe = write_recipe(fast_http, {"base": "hf://acme/tiny-sd@main/unet/model.safetensors", "style": "civitai:222"})
    result = runner.invoke(app, ["fetch", str(recipe), "base", "-q"])
    assert "Traceback" not in result.output
    assert all(a is None for a in _authorizations(civitai, "/cdn/model"))
    sent = [r.authorization for r in civitai.log if r.path.startswith("/acme/")]
    assert sent and all(a == f"Bearer {HF_SECRET}" for a in sent)  # the Hub itself gets it


@pytest.mark.parametrize(
    "url,allowed",
    [
        ("https://civitai.com/api/download/models/1", True),
        ("https://CIVITAI.com:443/api/v1/models/1", True),
        ("http://civitai.com/api/download/models/1", False),  # plain http: never
        ("https://civitai.com:8443/api/download/models/1", False),  # another port, another origin
        ("https://civitai.com.evil.example/x", False),
        ("https://evil.example/civitai.com/x", False),
        ("https://user@evil.example/x", False),
        ("https://civitai.com:bad/x", False),
    ],
)
def test_token_origin_rule(url, allowed, monkeypatch):
    monkeypatch.delenv("LORAFORGE_CIVITAI_BASE", raising=False)
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    assert token_allowed(url, "https://civitai.com") is allowed
    assert bool(civitai_auth(url).headers) is allowed and bool(https_auth(url).headers) is allowed


def test_a_plain_http_base_elsewhere_gets_no_token(monkeypatch):
    monkeypatch.setenv("LORAFORGE_CIVITAI_BASE", "http://mirror.example")
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    assert civitai_auth("http://mirror.example/api/v1/models/1").headers == {}
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example")
    from loraforge.resolve.sources.hf import hub_token as _token

    assert _token() is False
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    assert _token() is None  # huggingface_hub's own lookup
