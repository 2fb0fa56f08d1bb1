"""Recipe matrices (recipe/matrix.py): a target with ``matrix:`` is built as one target per combination.

The reference for a variant is the same target written out by hand: its
output must be the same bytes. Errors must point at the matrix line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import RecipeError
from loraforge.formats.hashing import file_hashes
from loraforge.recipe.loader import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
runner = CliRunner()

HEAD = """\
loraforge: 1
name: grid
date: "2026-11-01"
precision: {compute: float32, save: float16}
inputs:
  base: {source: models/tiny-sd15-base.safetensors}
  neon: {source: models/neon-lora.safetensors}
  noir: {source: models/noir-locon.safetensors}
targets:
"""

GRID = HEAD + """\
  styled:
    kind: checkpoint
    base: base
    loras:
      - {use: neon, strength: 0.8}
      - {use: noir, strength: -0.3}
    matrix:
      loras.neon.strength: [0.6, 1.0]
      precision.save: [float16, bfloat16]
"""


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    for name in ("tiny-sd15-base", "neon-lora", "noir-locon"):
        shutil.copy(RECIPES / "models" / f"{name}.safetensors", tmp_path / "models")
    return tmp_path


def write(folder: Path, text: str, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def built_names(output: str) -> list[str]:
    return [line.split()[1] for line in output.splitlines() if line.startswith("built ")]


def test_a_matrix_becomes_one_target_per_combination_last_axis_fastest(folder):
    loaded = load_recipe(write(folder, GRID))
    names = list(loaded.recipe.targets)
    assert names == [
        "styled@strength=0.6,save=float16", "styled@strength=0.6,save=bfloat16",
        "styled@strength=1.0,save=float16", "styled@strength=1.0,save=bfloat16",
    ]
    variant = loaded.recipe.targets["styled@strength=1.0,save=bfloat16"]
    assert [use.strength for use in variant.loras] == [1.0, -0.3]
    assert loaded.recipe.effective_precision(names[3]).save == "bfloat16"
    assert loaded.recipe.default_output(names[0]) == "dist/styled@strength=0.6,save=float16.safetensors"
    assert loaded.matrices["styled"].shape == "2 × 2 (strength × save)"


def test_an_explicit_output_gets_the_values_added_to_its_stem(folder):
    text = GRID.replace("    matrix:", "    output: out/look.safetensors\n    matrix:")
    loaded = load_recipe(write(folder, text))
    assert loaded.recipe.default_output("styled@strength=1.0,save=float16") == "out/look@strength=1.0,save=float16.safetensors"


def test_axes_sharing_a_field_name_are_labelled_by_the_lora(folder):
    text = GRID.replace("      precision.save: [float16, bfloat16]\n", "      loras.noir.strength: [0, 0.5]\n      loras.0.te: [0.5]\n")
    names = list(load_recipe(write(folder, text)).recipe.targets)
    assert names[0] == "styled@neon=0.6,noir=0,te=0.5"
    assert len(names) == 4


def test_non_plain_values_are_named_by_position(folder):
    text = GRID.replace("      precision.save: [float16, bfloat16]\n",
                        "      loras.noir.blocks: [{default: 0.5}, {default: 1, OUT09-OUT11: 0}]\n")
    names = list(load_recipe(write(folder, text)).recipe.targets)
    assert names[:2] == ["styled@strength=0.6,blocks=v1", "styled@strength=0.6,blocks=v2"]


def test_each_variant_is_byte_identical_to_the_target_written_out(folder):
    grid = write(folder, GRID)
    result = invoke("build", "-q", grid)
    assert result.exit_code == 0, result.output
    by_hand = write(folder, HEAD + """\
  styled-by-hand:
    kind: checkpoint
    base: base
    precision: {save: bfloat16}
    loras:
      - {use: neon, strength: 0.6}
      - {use: noir, strength: -0.3}
""", "by-hand.yaml")
    result = invoke("build", "-q", by_hand)
    assert result.exit_code == 0, result.output
    variant = file_hashes(folder / "dist" / "styled@strength=0.6,save=bfloat16.safetensors")
    written_out = file_hashes(folder / "dist" / "styled-by-hand.safetensors")
    assert variant.data_sha256 == written_out.data_sha256  # the tensors; the metadata names the target
    others = {file_hashes(folder / "dist" / f"styled@{v}.safetensors").data_sha256
              for v in ("strength=0.6,save=float16", "strength=1.0,save=float16", "strength=1.0,save=bfloat16")}
    assert len(others | {variant.data_sha256}) == 4  # every value changes the bytes
    lock = json.loads((folder / "grid.lock").read_text())
    assert sorted(lock["targets"]) == sorted(load_recipe(grid).recipe.targets)


def test_changing_one_value_rebuilds_only_the_variants_that_use_it(folder):
    grid = write(folder, GRID)
    assert invoke("build", "-q", grid).exit_code == 0
    write(folder, GRID.replace("[0.6, 1.0]", "[0.7, 1.0]"))
    result = invoke("build", grid)
    assert result.exit_code == 0, result.output
    assert built_names(result.output) == ["styled@strength=0.7,save=float16", "styled@strength=0.7,save=bfloat16"]
    assert "up to date styled@strength=1.0,save=float16" in result.output
    again = invoke("build", grid)
    assert built_names(again.output) == [] and "nothing to do" in again.output


def test_the_matrix_name_selects_every_variant_and_plan_shows_the_grid(folder):
    text = GRID + """\
  other:
    kind: checkpoint
    base: base
    loras: [{use: noir}]
"""
    grid = write(folder, text)
    result = invoke("plan", "--json", grid, "styled")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [t["name"] for t in report["targets"]] == list(load_recipe(grid).matrices["styled"].variants)
    assert report["not_selected"] == ["other"]
    assert report["matrices"] == [{
        "target": "styled",
        "axes": [{"path": "loras.neon.strength", "label": "strength", "values": [0.6, 1.0]},
                 {"path": "precision.save", "label": "save", "values": ["float16", "bfloat16"]}],
        "variants": [t["name"] for t in report["targets"]],
    }]
    tree = invoke("plan", grid)
    assert "styled: matrix of strength (2) × save (2), 4 variants planned" in tree.output


def test_a_variant_can_be_read_by_another_target_and_bundled(folder):
    text = GRID + """\
  chained:
    kind: checkpoint
    base: styled@strength=1.0,save=float16
    loras: [{use: noir, strength: 0.5}]
  release:
    kind: release
    include:
      - styled@strength=0.6,save=float16
"""
    grid = write(folder, text)
    result = invoke("build", "-q", grid, "chained", "release")
    assert result.exit_code == 0, result.output
    assert sorted(built_names(result.output)) == sorted(
        ["styled@strength=1.0,save=float16", "styled@strength=0.6,save=float16", "chained", "release"])
    assert (folder / "dist" / "release" / "styled@strength=0.6,save=float16.safetensors").is_file()


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("matrix", "needle", "message"),
    [
        ("      loras.missing.strength: [0.5]\n", "loras.missing", "loras.missing names no entry of the list"),
        ("      kind: [lora]\n", "      kind:", "a matrix cannot vary 'kind'"),
        ("      loras.neon.strength: []\n", "loras.neon", "needs a non-empty list of values"),
        ("      loras.neon.strength: 0.5\n", "loras.neon", "needs a non-empty list of values"),
        ("      loras.neon.strength: [0.5, 0.5]\n", "loras.neon", "the value 0.5 is listed twice"),
        ("      base.file: [x]\n", "base.file", "base is a single value, it has no field 'file'"),
        ("      loras.neon.strength: [0.6, abc]\n", "loras.neon", "expected a number"),
        ("      precision.save: [float16, float8]\n", "precision.save", "float8"),
        ("      loras.neon.strength: [" + ", ".join(str(i / 100) for i in range(257)) + "]\n", "    matrix:", "257 variants, more than 256"),
    ],
)
def test_bad_matrices_are_one_positioned_error(folder, matrix, needle, message):
    text = GRID.split("    matrix:\n")[0] + "    matrix:\n" + matrix
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(folder, text))
    assert message in str(caught.value)
    assert caught.value.problems[0].line == line_of(text, needle), str(caught.value)


def test_reading_or_releasing_a_whole_matrix_names_a_variant_instead(folder):
    reader = write(folder, GRID + "  chained:\n    kind: checkpoint\n    base: styled\n    loras: [{use: noir}]\n")
    result = invoke("plan", reader)
    assert result.exit_code != 0
    assert "'styled' is a matrix of 4 variants" in result.output and "styled@strength=0.6,save=float16" in result.output
    release = write(folder, GRID + "  release:\n    kind: release\n    include: [styled]\n")
    with pytest.raises(RecipeError, match="a release lists the variants it bundles"):
        load_recipe(release)


def test_unquoted_variant_names_in_a_flow_list_get_a_hint(folder):
    release = write(folder, GRID + "  release:\n    kind: release\n    include: [styled@strength=0.6,save=float16]\n")
    with pytest.raises(RecipeError, match="quote it"):
        load_recipe(release)


def test_a_hand_written_variant_name_is_refused(folder):
    text = HEAD + "  look@strength=1:\n    kind: checkpoint\n    base: base\n    loras: [{use: neon}]\n"
    with pytest.raises(RecipeError, match="made by matrix"):
        load_recipe(write(folder, text))


def test_the_example_matrix_recipe_builds_its_grid():
    loaded = load_recipe(RECIPES / "matrix-demo.yaml")
    assert loaded.matrices["neon-noir"].shape == "2 × 3 (neon × noir)"
    lock = json.loads((RECIPES / "matrix-demo.lock").read_text())
    assert sorted(lock["targets"]) == sorted(loaded.recipe.targets)
