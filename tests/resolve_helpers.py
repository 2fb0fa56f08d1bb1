"""Shared setup of the resolver tests: a local HTTP server, fast HTTP settings, small files."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from loraforge.testing.http_server import LocalServer


def safetensors_bytes(n_floats: int, seed: int = 0) -> bytes:
    """A valid one-tensor safetensors file, built by hand (independent of our writer)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    data = b"".join(struct.pack("<f", float((i * 7919 + seed) % 1013)) for i in range(n_floats))
    return struct.pack("<Q", len(header)) + header + data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_sha(data: bytes) -> str:
    start = 8 + struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[start:]).hexdigest()


@pytest.fixture
def server():
    running = LocalServer().start()
    yield running
    running.stop()


@pytest.fixture
def fast_http(monkeypatch, tmp_path):
    """Short timeouts, quick retries, a store and an HF cache of this test's own, no tokens."""
    monkeypatch.setenv("LORAFORGE_HTTP_TIMEOUT", "2")
    monkeypatch.setenv("LORAFORGE_HTTP_RETRIES", "2")
    monkeypatch.setenv("LORAFORGE_HTTP_BACKOFF", "0.01")
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CIVITAI_API_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-hf-token"))
    return tmp_path


def write_recipe(folder, inputs: dict[str, str], sha256: dict[str, str] | None = None) -> "Path":
    """A recipe whose inputs are the given sources (one checkpoint target naming them)."""
    lines = ["loraforge: 1", "name: fetch-test", "inputs:"]
    for name, source in inputs.items():
        pin = f", sha256: {sha256[name]}" if sha256 and name in sha256 else ""
        lines.append(f"  {name}: {{source: '{source}'{pin}}}")
    names = list(inputs)
    lines += ["targets:", "  out:", "    kind: checkpoint", f"    base: {names[0]}", "    loras:"]
    lines += [f"      - use: {n}" for n in names[1:]] or ["      []"]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
