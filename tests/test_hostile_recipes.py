"""Every broken or hostile recipe of the corpus: refused by `plan` and `build` with one positioned paragraph, nothing written."""

from __future__ import annotations

import pytest

from corpus import recipes as recipe_corpus
from hostile import OUTPUT, assert_clear_refusal, make_project, run_cli, snapshot, write_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def project(tmp_path, models, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    return make_project(tmp_path / "project", models)


def test_the_good_recipe_builds(project):
    (project / "recipe.yaml").write_text(recipe_corpus.GOOD)
    code, output = run_cli("build", project / "recipe.yaml", "-q")
    assert code == 0, output
    assert (project / OUTPUT).is_file()


@pytest.mark.parametrize("case", sorted(recipe_corpus.CASES))
def test_hostile_recipe_is_refused_and_nothing_is_written(project, tmp_path, case):
    spec = recipe_corpus.CASES[case]
    recipe = spec.make(project)
    before = snapshot(project, tmp_path / "cache", tmp_path / "elsewhere")
    for command in ("plan", "build"):
        message = assert_clear_refusal(*run_cli(command, recipe, *(["-q"] if command == "build" else [])), spec.fragments)
        assert "recipe.yaml:" in message  # file:line:column of the problem
    assert snapshot(project, tmp_path / "cache", tmp_path / "elsewhere") == before
    assert not (tmp_path.parent / "pwned").exists() and not (project / "pwned").exists()
