"""The lock file through the CLI: written by build, byte-stable, enforced by --locked; --offline; cache commands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.plan import numeric_environment as environments
from loraforge.plan.numeric_environment import NumericEnvironment, numeric_environment
from loraforge.resolve.lockfile import read_lock
from loraforge.testing.arch import tiny_architecture
from loraforge.resolve.store import Store
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint
from loraforge.testing.http_server import Blob
from resolve_helpers import fast_http, server  # noqa: F401

runner = CliRunner()

RECIPE = """\
loraforge: 1
name: lock-demo
date: "2026-11-01"
precision: {{save: float16}}
inputs:
  base: {{source: models/base.safetensors}}
  style: {{source: '{style}'}}
targets:
  baked:
    kind: checkpoint
    base: base
    loras:
      - {{use: style, strength: {strength}}}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lock-models")
    sd1 = tiny_architecture("sd1")
    write_synthetic_checkpoint(folder / "base.safetensors", sd1, seed=1, dtype="F32")
    write_synthetic_adapter(folder / "style.safetensors", sd1, "lora", rank=4, seed=2)
    write_synthetic_adapter(folder / "other.safetensors", sd1, "lora", rank=4, seed=3)
    return folder


@pytest.fixture
def project(fast_http, models) -> Path:
    (fast_http / "models").mkdir()
    for name in ("base", "style", "other"):
        shutil.copy(models / f"{name}.safetensors", fast_http / "models")
    _write(fast_http)
    return fast_http


def _write(folder: Path, style: str = "models/style.safetensors", strength: float = 0.7) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(style=style, strength=strength))
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_writes_a_lock_with_inputs_and_targets(project):
    result = invoke("build", project / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    text = (project / "recipe.lock").read_text()
    lock = json.loads(text)
    output = project / "dist/baked.safetensors"
    assert lock["format"] == "loraforge-lock/1" and lock["loraforge"]
    from loraforge.plan.action_key import BAKE_NUMERIC_POLICY

    assert lock["numeric_policy"]["bake"] == BAKE_NUMERIC_POLICY
    base = project / "models/base.safetensors"
    assert lock["inputs"]["base"]["sha256"] == _sha(base) and lock["inputs"]["base"]["size"] == base.stat().st_size
    assert lock["inputs"]["base"]["resolved"] == {"path": "models/base.safetensors"}
    assert lock["targets"]["baked"]["output"] == "dist/baked.safetensors"
    assert lock["targets"]["baked"]["sha256"] == _sha(output)
    assert lock["targets"]["baked"]["size"] == output.stat().st_size
    plan = json.loads(invoke("plan", project / "recipe.yaml", "--json").output)
    assert lock["targets"]["baked"]["action_key"] == plan["targets"][0]["action_key"]
    # Deterministic text: sorted keys, and the same bytes after another build and after `lock`.
    assert text == json.dumps(lock, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert invoke("build", project / "recipe.yaml", "-q").exit_code == 0
    assert (project / "recipe.lock").read_text() == text
    assert invoke("lock", project / "recipe.yaml", "-q").exit_code == 0
    assert (project / "recipe.lock").read_text() == text


def test_locked_build_passes_when_nothing_changed_and_keeps_the_lock(project):
    assert invoke("build", project / "recipe.yaml", "-q").exit_code == 0
    before = (project / "recipe.lock").read_bytes()
    result = invoke("build", project / "recipe.yaml", "-q", "--locked", "--offline")
    assert result.exit_code == 0, result.output
    assert (project / "recipe.lock").read_bytes() == before


def test_locked_build_fails_after_an_input_file_changed(project):
    assert invoke("build", project / "recipe.yaml", "-q").exit_code == 0
    output = project / "dist/baked.safetensors"
    built = output.read_bytes()
    shutil.copy(project / "models/other.safetensors", project / "models/style.safetensors")
    result = invoke("build", project / "recipe.yaml", "-q", "--locked")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "input 'style'" in text and "changed since the lock" in text
    assert _sha(project / "models/style.safetensors") in text
    assert output.read_bytes() == built  # nothing rebuilt
    # Without --locked the change is accepted and recorded.
    assert invoke("build", project / "recipe.yaml", "-q").exit_code == 0
    lock = json.loads((project / "recipe.lock").read_text())
    assert lock["inputs"]["style"]["sha256"] == _sha(project / "models/style.safetensors")


def test_locked_build_fails_when_a_target_changed_or_there_is_no_lock(project):
    missing = invoke("build", project / "recipe.yaml", "-q", "--locked")
    assert missing.exit_code == 2 and "no lock file" in " ".join(missing.output.split())
    assert invoke("build", project / "recipe.yaml", "-q").exit_code == 0
    _write(project, strength=0.5)
    result = invoke("build", project / "recipe.yaml", "-q", "--locked")
    assert result.exit_code == 2 and "target 'baked'" in " ".join(result.output.split())
    _write(project, style="models/other.safetensors")
    result = invoke("build", project / "recipe.yaml", "-q", "--locked")
    assert result.exit_code == 2 and "'models/other.safetensors' in the recipe" in " ".join(result.output.split())


# --- the numeric environment of SVD steps ------------------------------------------

RESIZE = """\
loraforge: 1
name: lock-resize
date: "2026-11-01"
precision: {save: float16}
inputs:
  style: {source: models/style.safetensors}
targets:
  resized:
    kind: lora
    method: svd
    loras:
      - {use: style}
    rank: 2
"""


def test_an_svd_step_records_its_numeric_environment_and_locked_builds_accept_another(project):
    recipe = project / "resize.yaml"
    recipe.write_text(RESIZE)
    assert invoke("build", recipe, "-q").exit_code == 0
    lock_file = project / "resize.lock"
    entry = json.loads(lock_file.read_text())["targets"]["resized"]
    assert entry["device_class"] == "cpu"
    assert entry["numeric_environment"] == numeric_environment("cpu").to_json()
    assert NumericEnvironment.from_json(entry["numeric_environment"]) == numeric_environment("cpu")
    output = project / "dist/resized.safetensors"
    # Locked on another CPU (or by an older loraforge, with no environment): the action key names the device
    # class only, so --locked rebuilds a missing output without complaint and leaves the lock as it was.
    for environment in ({**entry["numeric_environment"], "processor": "other", "isa": "avx512f"}, None):
        lock = json.loads(lock_file.read_text())
        lock["targets"]["resized"].pop("numeric_environment", None)
        if environment is not None:
            lock["targets"]["resized"]["numeric_environment"] = environment
        lock_file.write_text(json.dumps(lock, sort_keys=True, indent=2) + "\n")
        before = lock_file.read_bytes()
        assert read_lock(lock_file).targets["resized"].get("numeric_environment") == environment
        output.unlink()
        result = invoke("build", recipe, "-q", "--locked", "--offline")
        assert result.exit_code == 0, result.output
        assert lock_file.read_bytes() == before and _sha(output) == entry["sha256"]


def test_numeric_environment_fields_and_differences(tmp_path, monkeypatch):
    here = numeric_environment("cpu")
    assert here is numeric_environment("cpu")  # computed once per process
    assert here.device_class == "cpu" and here.torch and here.blas
    assert here.label().startswith(f"cpu/{here.blas}/{here.processor}/{here.isa}")
    assert NumericEnvironment.from_json(None) is None and NumericEnvironment.from_json({"device_class": "cpu"}) is None
    other = NumericEnvironment(**{**here.to_json(), "isa": "avx512f" if here.isa != "avx512f" else "avx2"})
    assert here.differences(here) == () and here.differences(other) == (f"isa {here.isa} vs {other.isa}",)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw\n")
    assert environments._cpuinfo(cpuinfo) == ("intel", frozenset({"fpu", "sse4_2", "avx", "avx2", "avx512f", "avx512bw"}))
    assert environments._cpuinfo(tmp_path / "absent") == ("unknown", frozenset())
    monkeypatch.setenv("MKL_CBWR", "avx2")
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    assert environments._blas_settings() == "MKL_CBWR=AVX2"


def test_remote_input_build_then_offline_build_uses_the_store(project, server, monkeypatch):
    server.routes["/loras/style.safetensors"] = Blob((project / "models/style.safetensors").read_bytes())
    _write(project, style=server.url("/loras/style.safetensors"))
    result = invoke("build", project / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    first = (project / "dist/baked.safetensors").read_bytes()
    lock = json.loads((project / "recipe.lock").read_text())
    assert lock["inputs"]["style"]["resolved"]["final_url"] == server.url("/loras/style.safetensors")
    requests = len(server.log)
    (project / "dist/baked.safetensors").unlink()
    result = invoke("build", project / "recipe.yaml", "-q", "--offline", "--locked")
    assert result.exit_code == 0, result.output
    assert len(server.log) == requests and (project / "dist/baked.safetensors").read_bytes() == first
    # The same recipe with an empty store: offline fails and names the input.
    monkeypatch.setenv("LORAFORGE_CACHE", str(project / "empty-cache"))
    result = invoke("build", project / "recipe.yaml", "-q", "--offline")
    assert result.exit_code == 2
    assert "input 'style'" in result.output and "not in the store" in " ".join(result.output.split())


def test_cache_ls_path_verify_and_gc(project, server):
    one, two = (project / "models/style.safetensors").read_bytes(), (project / "models/other.safetensors").read_bytes()
    server.routes["/a.safetensors"] = Blob(one)
    server.routes["/b.safetensors"] = Blob(two)
    _write(project, style=server.url("/a.safetensors"))
    assert invoke("fetch", project / "recipe.yaml", "-q").exit_code == 0
    assert invoke("lock", project / "recipe.yaml", "-q").exit_code == 0
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    _write(elsewhere, style=server.url("/b.safetensors"))
    (elsewhere / "models").symlink_to(project / "models")
    assert invoke("fetch", elsewhere / "recipe.yaml", "-q").exit_code == 0
    shutil.rmtree(elsewhere)  # its recipe and lock are gone: its blob is garbage

    listing = json.loads(invoke("cache", "ls", "--json").output)
    sources = {b["sha256"]: b["sources"] for b in listing["blobs"]}
    sha_one, sha_two = hashlib.sha256(one).hexdigest(), hashlib.sha256(two).hexdigest()
    assert sources == {sha_one: [server.url("/a.safetensors")], sha_two: [server.url("/b.safetensors")]}
    assert invoke("cache", "path").output.strip() == str(Store().root)
    assert invoke("cache", "path", sha_one[:8]).output.strip() == str(Store().blob_path(sha_one))

    dry = invoke("cache", "gc", project, "--dry-run")
    assert dry.exit_code == 0 and f"would remove {sha_two}" in dry.output and sha_one not in dry.output
    assert Store().get(sha_two) is not None
    assert invoke("cache", "gc", project).exit_code == 0
    assert Store().get(sha_two) is None and Store().get(sha_one) is not None

    blob = Store().blob_path(sha_one)
    os.chmod(blob, 0o644)
    blob.write_bytes(one[:-3] + b"xyz")
    checked = invoke("cache", "verify")
    assert checked.exit_code == 1 and f"removed damaged blob {sha_one}" in checked.output
    assert not blob.exists()
