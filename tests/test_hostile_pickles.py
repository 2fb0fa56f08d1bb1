"""Pickled inputs: refused by default with an explanation; with `allow_pickle: true` loaded tensors-only.

The malicious pickle's payload (creating a marker file) demonstrably runs
under the full unpickler, and never under loraforge.
"""

from __future__ import annotations

import torch
import pytest

from corpus import pickles
from hostile import OUTPUT, assert_clear_refusal, make_project, run_cli, snapshot, write_models

from loraforge.errors import FormatError
from loraforge.formats.pickle_input import SOURCE_KEY, load_pickled_tensors
from loraforge.formats.safetensors_reader import open_safetensors


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def project(tmp_path, models, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    return make_project(tmp_path / "project", models)


def _point(project, input_name: str, file: str, allow: bool = False) -> None:
    recipe = project / "recipe.yaml"
    old = f"  {input_name}: {{source: models/{input_name}.safetensors}}"
    new = f"  {input_name}: {{source: {file}{', allow_pickle: true' if allow else ''}}}"
    recipe.write_text(recipe.read_text().replace(old, new))


def _tensors(path):
    with open_safetensors(path) as file:
        return {name: file.read_bytes(name) for name in file.names()}


@pytest.mark.parametrize("kind", ["zip", "legacy"])
@pytest.mark.parametrize("role", ["base", "style"])
def test_pickles_are_refused_by_default_with_the_reason(project, tmp_path, kind, role):
    writer = pickles.zip_checkpoint if kind == "zip" else pickles.legacy_pickle
    suffix = ".ckpt" if kind == "zip" else ".pt"
    writer(project / f"models/{role}{suffix}", pickles.from_safetensors(project / f"models/{role}.safetensors"))
    _point(project, role, f"models/{role}{suffix}")
    before = snapshot(project, tmp_path / "cache")
    words = "a PyTorch checkpoint (a zip archive" if kind == "zip" else "a Python pickle (the legacy torch.save format)"
    fragments = [f"inputs.{role}.source", words, "unpickling can run any code", "allow_pickle: true", "weights_only=True"]
    for command in ("plan", "build"):
        assert_clear_refusal(*run_cli(command, project / "recipe.yaml"), fragments)
    assert_clear_refusal(*run_cli("inspect", project / f"models/{role}{suffix}"), fragments[1:])
    assert snapshot(project, tmp_path / "cache") == before


def test_bin_extension_with_unknown_content_is_called_a_pickle(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x00" * 64)
    assert_clear_refusal(*run_cli("inspect", path), ["by its .bin extension", "allow_pickle"])


def test_allowed_pickles_build_the_same_tensors_as_safetensors(project, tmp_path):
    reference_code, output = run_cli("build", project / "recipe.yaml", "-q")
    assert reference_code == 0, output
    reference = _tensors(project / OUTPUT)
    pickles.zip_checkpoint(project / "models/base.ckpt", pickles.from_safetensors(project / "models/base.safetensors"))
    pickles.legacy_pickle(project / "models/style.pt", pickles.from_safetensors(project / "models/style.safetensors"))
    _point(project, "base", "models/base.ckpt", allow=True)
    _point(project, "style", "models/style.pt", allow=True)
    code, output = run_cli("build", project / "recipe.yaml", "-q")
    assert code == 0, output
    baked = _tensors(project / OUTPUT)
    assert sorted(baked) == sorted(reference)
    assert baked == reference  # bit-identical weights: the conversion is exact
    converted = sorted((tmp_path / "cache/converted").iterdir())
    assert len(converted) == 2 and all(p.suffix == ".safetensors" for p in converted)
    for entry in converted:
        with open_safetensors(entry) as file:
            assert file.metadata[SOURCE_KEY] == entry.stem  # named by and recording the pickle's sha256
    # A second build reuses the conversions (same files, same bytes out).
    stamps = {p: p.stat().st_mtime_ns for p in converted}
    first = (project / OUTPUT).read_bytes()
    assert run_cli("build", project / "recipe.yaml", "-q")[0] == 0
    assert {p: p.stat().st_mtime_ns for p in converted} == stamps
    assert (project / OUTPUT).read_bytes() == first


def test_malicious_pickle_never_runs(project, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickles.malicious(project / "models/evil.ckpt", marker, pickles.from_safetensors(project / "models/base.safetensors"))
    # Control: the full unpickler does run the payload.
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    _point(project, "base", "models/evil.ckpt", allow=True)
    before = snapshot(project, tmp_path / "cache")
    fragments = ["inputs.base.source", "could not be loaded as a tensors-only pickle", "Unsupported global: GLOBAL io.open was not an allowed global"]
    assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"), fragments)
    assert_clear_refusal(*run_cli("inspect", evil), ["unpickling can run any code"])
    with pytest.raises(FormatError):
        load_pickled_tensors(evil)
    assert not marker.exists()
    assert snapshot(project, tmp_path / "cache") == before  # no conversion entry, no temp file


@pytest.mark.parametrize(
    "content,fragment",
    [
        ([torch.zeros(2)], "holds a list, not a dictionary of named tensors"),
        ({"epoch": 3}, "holds no tensors"),
        ({3: torch.zeros(2)}, "under the key 3"),
        ({"w": torch.zeros(2, dtype=torch.complex64)}, "has dtype torch.complex64"),
    ],
)
def test_pickles_that_are_not_state_dicts_are_refused(tmp_path, content, fragment):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(FormatError, match="odd.pt") as caught:
        load_pickled_tensors(path)
    assert fragment in str(caught.value)


def test_damaged_pickle_is_a_format_error(tmp_path):
    path = pickles.zip_checkpoint(tmp_path / "cut.ckpt", {"w": torch.zeros(64)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FormatError, match="could not be loaded as a tensors-only pickle"):
        load_pickled_tensors(path)
