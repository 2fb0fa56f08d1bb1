"""https downloads against a real server on 127.0.0.1: resume, retries, errors, redirects, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.resolve.store import Store
from loraforge.testing.http_server import Blob, Redirect
from resolve_helpers import fast_http, safetensors_bytes, server, sha, write_recipe  # noqa: F401

runner = CliRunner()
DATA = safetensors_bytes(50_000, seed=1)  # 200 KiB: several chunks
BASE = safetensors_bytes(1000, seed=2)


def _recipe(folder, server, path="/files/lora.safetensors", pin=None):
    server.routes.setdefault("/files/base.safetensors", Blob(BASE))
    sources = {"base": server.url("/files/base.safetensors"), "lora": server.url(path)}
    return write_recipe(folder, sources, {"lora": pin} if pin else None)


def _fetch(recipe, *extra):
    return runner.invoke(app, ["fetch", str(recipe), "-q", "--json", *extra])


def _blobs():
    return sorted(p.name for p in Store().blobs())


def test_dropped_download_resumes_from_the_partial_file_on_the_next_run(server, fast_http, monkeypatch):
    monkeypatch.setenv("LORAFORGE_HTTP_RETRIES", "0")  # the first run gives up at the drop
    server.routes["/files/lora.safetensors"] = Blob(DATA, drop_after=70_000, drops=1)
    recipe = _recipe(fast_http, server)
    first = _fetch(recipe)
    assert first.exit_code == 2 and "'lora'" in first.output and "resume" in first.output
    partials = list((Store().root / "partial").glob("*.part"))
    assert [p.stat().st_size for p in partials] == [70_000]

    second = _fetch(recipe)
    assert second.exit_code == 0, second.output
    gets = server.requests("/files/lora.safetensors")
    assert [(g.range, g.body_bytes, g.status) for g in gets] == [
        (None, 70_000, 200),
        ("bytes=70000-", len(DATA) - 70_000, 206),
    ]
    row = {r["input"]: r for r in json.loads(second.output)["inputs"]}["lora"]
    assert row["sha256"] == sha(DATA) and row["status"] == "downloaded"
    assert Store().get(sha(DATA)).path.read_bytes() == DATA
    assert list((Store().root / "partial").glob("*.part")) == []


def test_a_drop_within_one_run_is_retried_from_where_it_stopped(server, fast_http):
    server.routes["/files/lora.safetensors"] = Blob(DATA, drop_after=100_000, drops=2)
    result = _fetch(_recipe(fast_http, server))
    assert result.exit_code == 0, result.output
    gets = server.requests("/files/lora.safetensors")
    assert [g.range for g in gets] == [None, "bytes=100000-", "bytes=200000-"]
    assert sum(g.body_bytes for g in gets) == len(DATA)
    assert sha(DATA) in _blobs()


def test_server_that_ignores_range_restarts_the_download(server, fast_http, monkeypatch):
    monkeypatch.setenv("LORAFORGE_HTTP_RETRIES", "0")
    blob = Blob(DATA, drop_after=50_000, drops=1)
    server.routes["/files/lora.safetensors"] = blob
    recipe = _recipe(fast_http, server)
    assert _fetch(recipe).exit_code == 2
    blob.ignore_range = True  # now answers 200 with the whole file to a Range request
    result = _fetch(recipe)
    assert result.exit_code == 0, result.output
    last = server.requests("/files/lora.safetensors")[-1]
    assert (last.range, last.status, last.body_bytes) == ("bytes=50000-", 200, len(DATA))
    assert Store().get(sha(DATA)).path.read_bytes() == DATA


def test_wrong_sha256_names_input_and_both_hashes_and_stores_nothing(server, fast_http):
    server.routes["/files/lora.safetensors"] = Blob(DATA)
    wrong = "ab" * 32
    recipe = _recipe(fast_http, server, pin=wrong)
    result = runner.invoke(app, ["build", str(recipe), "-q"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "'lora'" in text and wrong in text and sha(DATA) in text and "recipe.yaml:" in text
    assert sha(DATA) not in _blobs()
    assert list((Store().root / "partial").glob("*")) == []
    assert not (fast_http / "dist").exists()


@pytest.mark.parametrize(
    "status, needle",
    [(404, "does not exist (HTTP 404)"), (401, "CIVITAI_API_TOKEN"), (403, "HF_TOKEN"), (410, "HTTP 410")],
)
def test_client_errors_fail_at_once_with_a_clear_message(server, fast_http, status, needle):
    server.routes["/files/lora.safetensors"] = status
    result = _fetch(_recipe(fast_http, server))
    assert result.exit_code == 2
    assert needle in " ".join(result.output.split()) and "'lora'" in result.output
    assert len(server.requests("/files/lora.safetensors")) == 1  # 4xx: no retries


def test_transient_errors_are_retried(server, fast_http):
    server.routes["/files/lora.safetensors"] = 503
    result = _fetch(_recipe(fast_http, server))
    assert result.exit_code == 2 and "failed after 3 tries" in result.output and "HTTP 503" in result.output
    assert len(server.requests("/files/lora.safetensors")) == 3


def test_redirect_chain_is_followed_and_the_lock_records_the_final_url(server, fast_http):
    server.routes["/files/lora.safetensors"] = Redirect("/hop/1", 301)
    server.routes["/hop/1"] = Redirect(server.url("/hop/2?token=secret"), 302)
    server.routes["/hop/2"] = Redirect("/real/lora.safetensors?X-Amz-Signature=abc", 307)
    server.routes["/real/lora.safetensors"] = Blob(DATA)
    recipe = _recipe(fast_http, server)
    result = runner.invoke(app, ["lock", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    text = (fast_http / "recipe.lock").read_text()
    entry = json.loads(text)["inputs"]["lora"]
    assert entry["resolved"] == {
        "url": server.url("/files/lora.safetensors"),
        "final_url": server.url("/real/lora.safetensors"),
    }
    assert entry["sha256"] == sha(DATA) and entry["size"] == len(DATA)
    assert "secret" not in text and "Signature" not in text


def test_slow_server_times_out_with_a_clear_message(server, fast_http, monkeypatch):
    monkeypatch.setenv("LORAFORGE_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("LORAFORGE_HTTP_RETRIES", "1")
    server.routes["/files/lora.safetensors"] = Blob(DATA, delay=1.5)
    started = time.monotonic()
    result = _fetch(_recipe(fast_http, server))
    assert time.monotonic() - started < 4
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "timeout" in text and "LORAFORGE_HTTP_TIMEOUT" in text and "2 tries" in text


def test_two_processes_fetching_one_url_make_one_valid_blob(server, fast_http):
    # Slow enough (about 0.6 s) that the two runs overlap.
    server.routes["/files/lora.safetensors"] = Blob(DATA, chunk_delay=0.2)
    recipe = _recipe(fast_http, server)
    env = {**os.environ}
    command = [sys.executable, "-m", "loraforge.cli", "fetch", str(recipe), "-q", "--json"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    for out, _ in outputs:
        rows = {r["input"]: r for r in json.loads(out)["inputs"]}
        assert rows["lora"]["sha256"] == sha(DATA)
    assert _blobs() == sorted([sha(DATA), sha(BASE)])
    assert Store().get(sha(DATA)).path.read_bytes() == DATA
    full = [g for g in server.requests("/files/lora.safetensors") if g.status == 200]
    assert len(full) == 1  # the second process waited and reused the first one's blob
