"""Issue 17, Low items (round 2): names that break elsewhere, recipes overwriting each other's outputs, a recipe
file named like a bundle's own files, EMA copies left unbaked. Each case through the CLI: the exit status, one
paragraph naming the recipe line and the fix, no traceback, and nothing written outside the expected files."""

from __future__ import annotations

import pytest

from hostile import OUTPUT, assert_clear_refusal, make_project, run_cli, snapshot, write_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


def _one_paragraph(output: str) -> None:
    assert output.strip().count("\n\n") == 0, output


# --- names that break elsewhere ---------------------------------------------------------------------


BAKED = "  baked:\n    kind: checkpoint\n"
NAMES = {
    "a Windows device name as target name": (
        lambda r: r.replace("  baked:\n", "  con:\n"),
        ["recipe.yaml:9", "targets.con", "the name 'con' is a device name Windows reserves", "choose another name"]),
    "a device name with an extension": (
        lambda r: r.replace("  baked:\n", "  lpt1.v2:\n"),
        ["targets['lpt1.v2']", "'lpt1.v2' is a device name Windows reserves"]),
    "a device name in an output path": (
        lambda r: r.replace(BAKED, BAKED + "    output: dist/NUL.safetensors\n"),
        ["recipe.yaml:11", "targets.baked.output", "uses 'NUL.safetensors', a device name Windows reserves"]),
    "a device name as output folder": (
        lambda r: r.replace(BAKED, BAKED + "    output: aux/baked.safetensors\n"),
        ["targets.baked.output", "uses 'aux'"]),
    "a newline in an output": (
        lambda r: r.replace(BAKED, BAKED + '    output: "dist/a\\nb.safetensors"\n'),
        ["recipe.yaml:11", "targets.baked.output", "contains the control character U+000A", "printable characters"]),
    "a tab in an output": (
        lambda r: r.replace(BAKED, BAKED + '    output: "dist/a\\tb.safetensors"\n'),
        ["targets.baked.output", "U+0009"]),
    "two outputs differing only by case": (
        lambda r: r.replace(BAKED, BAKED + "    output: dist/Baked.safetensors\n")
        + "  other:\n    kind: checkpoint\n    base: base\n    output: dist/baked.safetensors\n"
          "    loras:\n      - {use: style, strength: 0.5}\n",
        ["targets.other.output", "targets 'baked' and 'other' write 'dist/Baked.safetensors' and 'dist/baked.safetensors'",
         "differ only by case", "differing in more than case"]),
    "a default output and an output differing only by case": (
        lambda r: r + "  other:\n    kind: checkpoint\n    base: base\n    output: dist/BAKED.safetensors\n"
                      "    loras:\n      - {use: style, strength: 0.5}\n",
        ["targets.other.output", "differ only by case"]),
}


@pytest.mark.parametrize("case", NAMES)
@pytest.mark.parametrize("command", ["plan", "build"])
def test_names_that_break_on_other_systems_are_refused_at_load(tmp_path, models, case, command):
    change, fragments = NAMES[case]
    root = make_project(tmp_path / "project", models)
    recipe = root / "recipe.yaml"
    recipe.write_text(change(recipe.read_text()))
    before = snapshot(root)
    code, output = run_cli(command, recipe)
    assert_clear_refusal(code, output, fragments)
    _one_paragraph(output)
    assert snapshot(root) == before


def test_ordinary_names_near_the_reserved_ones_still_build(tmp_path, models):
    root = make_project(tmp_path / "project", models)
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("  baked:\n", "  console:\n").replace(
        "    kind: checkpoint\n", "    kind: checkpoint\n    output: dist/com10/nul-free.safetensors\n"))
    code, output = run_cli("build", recipe, "-q")
    assert code == 0, output
    assert (root / "dist/com10/nul-free.safetensors").is_file()
