"""Every broken safetensors file and adapter of the corpus, through the CLI.

For each: `inspect` and `build` (with the file as the base and as the LoRA)
exit with status 2 and one paragraph naming the problem, and neither the
recipe folder (whose earlier output must survive byte for byte) nor the
cache changes.
"""

from __future__ import annotations

import pytest

from corpus import adapters as adapter_corpus
from corpus import safetensors_files as file_corpus
from hostile import OUTPUT, assert_clear_refusal, make_project, run_cli, snapshot, write_models

from loraforge.errors import FormatError
from loraforge.formats.adapters import parse_adapter
from loraforge.formats.safetensors_reader import open_safetensors


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def previous_output(tmp_path_factory, models) -> bytes:
    """The output of a good build, standing in for last week's release."""
    root = make_project(tmp_path_factory.mktemp("good"), models)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    return (root / OUTPUT).read_bytes()


@pytest.fixture
def project(tmp_path, models, previous_output, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    return make_project(tmp_path / "project", models, previous_output)


def _use_as(project, role: str, path) -> None:
    recipe = project / "recipe.yaml"
    old = "models/base.safetensors" if role == "base" else "models/style.safetensors"
    recipe.write_text(recipe.read_text().replace(old, str(path.relative_to(project))))


@pytest.mark.parametrize("case", sorted(file_corpus.CASES))
def test_broken_safetensors_is_refused_everywhere(project, tmp_path, previous_output, case):
    spec = file_corpus.CASES[case]
    path = spec.make(project / "models")
    with pytest.raises(FormatError):
        open_safetensors(path)
    assert_clear_refusal(*run_cli("inspect", path), spec.fragments)
    for role in ("base", "style"):
        _use_as(project, role, path)
        before = snapshot(project, tmp_path / "cache")
        message = assert_clear_refusal(*run_cli("build", project / "recipe.yaml", "-q"), spec.fragments)
        assert "recipe.yaml:" in message  # the refusal points at the recipe line that reads the file
        assert snapshot(project, tmp_path / "cache") == before
        _use_as(project, role, project / ("models/base.safetensors" if role == "base" else "models/style.safetensors"))
    assert (project / OUTPUT).read_bytes() == previous_output


@pytest.mark.parametrize("case", sorted(adapter_corpus.CASES))
def test_broken_adapter_is_refused_and_nothing_is_written(project, tmp_path, previous_output, case):
    spec = adapter_corpus.CASES[case]
    path = spec.make(project / "models")
    _use_as(project, "style", path)
    before = snapshot(project, tmp_path / "cache")
    plan_code, plan_output = run_cli("plan", project / "recipe.yaml")
    build_code, build_output = run_cli("build", project / "recipe.yaml", "-q")
    assert_clear_refusal(build_code, build_output, spec.fragments)
    if spec.extra["stage"] == "plan":
        assert_clear_refusal(plan_code, plan_output, spec.fragments)
        assert "recipe.yaml:" in build_output
    else:
        assert plan_code == 0, plan_output  # factor values are read when baking, not when planning
    assert snapshot(project, tmp_path / "cache") == before
    assert (project / OUTPUT).read_bytes() == previous_output


def test_adapter_corpus_is_refused_by_the_library_with_format_errors(tmp_path):
    """The header-level adapter cases fail in parse_adapter or matching; none crashes with another type."""
    for name, spec in sorted(adapter_corpus.CASES.items()):
        folder = tmp_path / name.replace(" ", "-").replace("/", "-")
        folder.mkdir()
        with open_safetensors(spec.make(folder)) as file:
            try:
                parse_adapter(file)
            except FormatError:
                pass
