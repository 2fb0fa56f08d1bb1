"""The loader: every user mistake becomes one RecipeError naming file, line:column and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import RecipeError
from loraforge.recipe import MAX_RECIPE_BYTES, load_recipe
from loraforge.recipe.yaml_source import MAX_DEPTH
from test_recipe_helpers import EXAMPLE, MINIMAL, assert_points_at, load_error, position_of, write


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    # Recipes are loaded by relative name, so messages start with "recipe.yaml:".
    monkeypatch.chdir(tmp_path)


# --- field errors --------------------------------------------------------------


def test_unknown_top_level_field_lists_allowed_fields(tmp_path):
    text = MINIMAL + "colour: red\n"
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "colour", "colour"), "colour")
    assert "unknown field 'colour'" in line
    assert "allowed fields here: loraforge, name, title" in line


def test_unknown_target_field_suggests_the_close_match(tmp_path):
    text = EXAMPLE.replace("    output: dist", "    outptu: dist")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "outptu", "outptu"), "targets.neon-noir.outptu")
    assert "did you mean 'output'?" in line
    assert "allow_unmatched" in line  # the full list of allowed names
    assert "checkpoint" not in line.split("targets.neon-noir.outptu")[1]  # no pydantic tag leaks into the path


def test_unknown_lora_field_suggests_the_close_match(tmp_path):
    text = EXAMPLE.replace("        te: 0.5", "        tee: 0.5")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "tee:", "tee"), "targets.neon-noir.loras[0].tee")
    assert "did you mean 'te'?" in line
    assert "ratio" in line  # the alias is an allowed name too


def test_strength_given_as_a_string_says_remove_the_quotes(tmp_path):
    text = EXAMPLE.replace("strength: 0.8", 'strength: "0.8"')
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "strength: \"0.8\"", "strength"), "targets.neon-noir.loras[0].strength")
    assert "expected a number, got the text '0.8'" in line
    assert "remove the quotes" in line


@pytest.mark.parametrize("written", ["true", "yes", "off"])
def test_strength_given_as_a_boolean_is_refused(tmp_path, written):
    text = EXAMPLE.replace("{use: noir, strength: -0.3}", f"{{use: noir, strength: {written}}}")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "use: noir", "strength"), "targets.neon-noir.loras[1].strength")
    assert "got the boolean" in line


def test_strength_and_ratio_together_point_at_ratio(tmp_path):
    text = EXAMPLE.replace("{use: noir, strength: -0.3}", "{use: noir, strength: -0.3, ratio: 0.2}")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "use: noir", "ratio"), "targets.neon-noir.loras[1].ratio")
    assert "both 'strength' and its alias 'ratio'" in line


def test_te_given_as_a_string_is_refused(tmp_path):
    text = EXAMPLE.replace("te: 0.5", "te: half")
    error = load_error(tmp_path, text)
    assert_points_at(error, "recipe.yaml", *position_of(text, "te: half", "te"), "targets.neon-noir.loras[0].te")


def test_missing_schema_version(tmp_path):
    text = MINIMAL.replace("loraforge: 1\n", "")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", 1, 1, "(top level)")
    assert "required field 'loraforge' is missing" in line
    assert "loraforge: 1" in line


def test_wrong_schema_version(tmp_path):
    text = MINIMAL.replace("loraforge: 1", "loraforge: 2")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", 1, 1, "loraforge")
    assert "unsupported recipe schema version 2" in line and "version 1" in line


def test_schema_version_as_text_is_refused(tmp_path):
    text = MINIMAL.replace("loraforge: 1", 'loraforge: "1"')
    error = load_error(tmp_path, text)
    assert_points_at(error, "recipe.yaml", 1, 1, "loraforge")


def test_bad_name_characters_suggest_a_valid_name(tmp_path):
    text = MINIMAL.replace("name: tiny", "name: Neon Noir!")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", 2, 1, "name")
    assert "'Neon Noir!' is not allowed" in line and "'neon-noir'" in line


def test_bad_input_name_points_at_the_key(tmp_path):
    text = MINIMAL.replace("  style:", "  My_Style:")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "My_Style", "My_Style"), "inputs.My_Style")
    assert "'My_Style' is not allowed" in line


def test_bad_sha256(tmp_path):
    text = EXAMPLE.replace(f'"{"0123456789abcdef".upper() * 4}"', '"abc123"')
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "base:  {source", "sha256"), "inputs.base.sha256")
    assert "64 hexadecimal digits, got 6 characters" in line


def test_unknown_target_kind_lists_supported_kinds(tmp_path):
    text = EXAMPLE.replace("kind: checkpoint", "kind: blend")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "kind: blend", "kind"), "targets.neon-noir.kind")
    assert "unknown target kind 'blend'" in line and "supported kinds: checkpoint, extract, lora" in line


def test_target_without_kind(tmp_path):
    text = EXAMPLE.replace("    kind: checkpoint\n", "")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "  neon-noir:", "neon-noir"), "targets.neon-noir")
    assert "no 'kind'" in line and "kind: checkpoint" in line


def test_unknown_precision_value_lists_allowed_values(tmp_path):
    text = EXAMPLE.replace("save: float16}", "save: fp16}")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "precision: {compute", "save"), "precision.save")
    assert "unknown save precision 'fp16'" in line
    assert "write float16 instead of 'fp16'" in line
    assert "float16, bfloat16, float32, same" in line


def test_unknown_per_target_precision(tmp_path):
    text = EXAMPLE.replace("{save: bfloat16}", "{compute: float16}")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "{compute: float16}", "compute"), "targets.neon-noir.precision.compute")
    assert "float32, float64" in line


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", "cuda:"])
def test_bad_device_string(tmp_path, device):
    text = EXAMPLE.replace("device: auto", f"device: '{device}'")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "device: '", "device"), "device")
    assert "auto, cpu, cuda, cuda:N" in line


def test_input_and_target_with_the_same_name(tmp_path):
    text = EXAMPLE.replace("  noir:  {source", "  neon-noir:  {source").replace("use: noir", "use: neon-noir")
    error = load_error(tmp_path, text)
    target_line = position_of(text, "  neon-noir:", "neon-noir", occurrence=2)
    line = assert_points_at(error, "recipe.yaml", *target_line, "targets.neon-noir")
    assert "used by an input and by a target" in line


def test_two_targets_writing_one_file(tmp_path):
    text = MINIMAL + "  second:\n    kind: checkpoint\n    base: base\n    output: ./dist/tiny-baked.safetensors\n"
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "output: ./dist", "output"), "targets.second.output")
    assert "both write" in line


def test_block_weight_item_of_the_wrong_type_points_at_the_item(tmp_path):
    text = EXAMPLE.replace("blocks: OUTD", 'blocks: [1, 0, "x"]')
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "blocks: [", '"x"'), "targets.neon-noir.loras[0].blocks[2]")
    assert "block weight" in line


def test_non_finite_block_weight_is_refused(tmp_path):
    text = EXAMPLE.replace("blocks: OUTD", "blocks: {default: 0, IN04: .nan}")
    error = load_error(tmp_path, text)
    assert_points_at(error, "recipe.yaml", *position_of(text, "blocks: {", "IN04"), "targets.neon-noir.loras[0].blocks.IN04")


def test_bad_source_syntax(tmp_path):
    text = EXAMPLE.replace("civitai:123456", "civitai:abc")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "civitai:abc", "source"), "inputs.noir.source")
    assert "civitai:<model version id>" in line


def test_all_problems_reported_sorted_by_position(tmp_path):
    text = EXAMPLE.replace("seed: 7", "seed: -1").replace("strength: 0.8", "strength: '0.8'").replace("device: cpu", "device: tpu")
    error = load_error(tmp_path, text)
    lines = str(error).splitlines()
    name = "recipe.yaml"
    assert lines[0] == f"{name}: the recipe has 3 problems:"
    expected = [
        (*position_of(text, "seed:", "seed"), "seed"),
        (*position_of(text, "strength: '0.8'", "strength"), "targets.neon-noir.loras[0].strength"),
        (*position_of(text, "device: tpu", "device"), "targets.neon-noir.device"),
    ]
    assert [line.split(": ")[0:2] for line in lines[1:]] == [[f"{name}:{l}:{c}", p] for l, c, p in expected]
    assert [(p.line, p.column) for p in error.problems] == [(l, c) for l, c, _ in expected]


def test_file_name_is_shown_as_given(tmp_path):
    (tmp_path / "sub").mkdir()
    text = MINIMAL.replace("loraforge: 1", "loraforge: 3")
    error = load_error(tmp_path, text, name="sub/my recipe.yml")
    assert str(error).startswith("sub/my recipe.yml:1:1: loraforge: ")


# --- YAML-level errors ---------------------------------------------------------


def test_yaml_syntax_error_has_a_position(tmp_path):
    text = MINIMAL.replace("  style: {source: style.safetensors}", "  style: {source: style.safetensors")
    error = load_error(tmp_path, text)
    message = str(error)
    assert message.startswith("recipe.yaml:")
    line, column = (int(part) for part in message.split(":")[1:3])
    # PyYAML notices the unclosed brace at the ':' after "targets" on the next line ...
    assert (line, column) == position_of(text, "targets:", ":")
    assert "YAML syntax error" in message
    # ... and the message also says where the unclosed flow mapping began.
    start_line, start_column = position_of(text, "style: {", "{")
    assert f"started at line {start_line}, column {start_column}" in message


def test_tab_indentation_gets_a_specific_hint(tmp_path):
    text = MINIMAL.replace("  base: {source", "\tbase: {source")
    error = load_error(tmp_path, text)
    assert str(error).startswith("recipe.yaml:4:1: YAML syntax error")
    assert "indent with spaces, not tabs" in str(error)


def test_duplicate_key_is_refused(tmp_path):
    text = MINIMAL + "name: again\n"
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "name: again", "name"), "name")
    assert "appears twice" in line and "first at line 2, column 1" in line


def test_file_over_the_size_limit(tmp_path):
    text = MINIMAL + "description: " + "x" * MAX_RECIPE_BYTES + "\n"
    error = load_error(tmp_path, text)
    assert str(error).startswith("recipe.yaml:1:1: the recipe file is larger than 1024 KiB")


def test_alias_bomb_is_refused_at_the_first_alias(tmp_path):
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        bomb.append(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    text = MINIMAL + "\n".join(bomb) + "\n"
    error = load_error(tmp_path, text)
    first_alias = position_of(text, "b: &b", "*a")
    assert str(error).startswith(f"recipe.yaml:{first_alias[0]}:{first_alias[1]}: YAML aliases (*name) are not allowed")


def test_merge_keys_are_refused(tmp_path):
    text = MINIMAL + "extra: {<<: {a: 1}}\n"
    error = load_error(tmp_path, text)
    assert "merge keys (<<) are not allowed" in str(error)


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    text = MINIMAL + "description: " + "[" * 10_000 + "]" * 10_000 + "\n"
    error = load_error(tmp_path, text)
    assert f"nested more than {MAX_DEPTH} levels" in str(error)


def test_python_tags_are_refused(tmp_path):
    text = MINIMAL + "description: !!python/object/apply:os.system ['echo hi']\n"
    error = load_error(tmp_path, text)
    assert str(error).startswith(f"recipe.yaml:{position_of(text, 'python', '!!')[0]}:")


def test_two_documents_are_refused(tmp_path):
    error = load_error(tmp_path, MINIMAL + "---\nname: other\n")
    assert "one YAML document" in str(error)


def test_empty_and_non_mapping_files(tmp_path):
    assert "the recipe is empty" in str(load_error(tmp_path, "# nothing\n"))
    assert "recipe.yaml:1:1: (top level): expected a mapping" in str(load_error(tmp_path, "- a\n- b\n"))


def test_non_utf8_file_reports_the_line(tmp_path):
    path = Path("recipe.yaml")
    path.write_bytes(MINIMAL.encode() + b"description: caf\xe9\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}:{MINIMAL.count(chr(10)) + 1}:17: the recipe is not UTF-8")


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


# --- positions and LoadedRecipe.error --------------------------------------------


def test_positions_of_keys_and_items(tmp_path):
    loaded = load_recipe(write(tmp_path, EXAMPLE))
    assert loaded.positions[("targets", "neon-noir", "loras", 0)] == position_of(EXAMPLE, "- use: neon", "use")
    assert loaded.positions[("targets", "neon-noir", "loras", 0, "blocks")] == position_of(EXAMPLE, "blocks: OUTD", "blocks")
    assert loaded.positions[("targets", "neon-noir", "loras", 1)] == position_of(EXAMPLE, "use: noir", "{")
    assert loaded.positions[("targets", "neon-noir", "loras", 1, "strength")] == position_of(EXAMPLE, "use: noir", "strength")
    assert loaded.positions[("inputs", "neon", "source")] == position_of(EXAMPLE, "neon:  {", "source")
    assert loaded.positions[("seed",)] == (6, 1)


def test_loaded_recipe_error_points_at_the_field(tmp_path):
    loaded = load_recipe(write(tmp_path, EXAMPLE))
    error = loaded.error(("targets", "neon-noir", "loras", 1, "use"), "input 'noir' does not exist", "add it under inputs:")
    line, column = position_of(EXAMPLE, "use: noir", "use")
    assert str(error) == (
        f"recipe.yaml:{line}:{column}: targets.neon-noir.loras[1].use: input 'noir' does not exist. Fix: add it under inputs:."
    )


def test_loaded_recipe_error_falls_back_to_the_nearest_parent(tmp_path):
    loaded = load_recipe(write(tmp_path, EXAMPLE))
    # ``te`` is not written for the second LoRA: the error points at that list item.
    error = loaded.error(("targets", "neon-noir", "loras", 1, "te"), "te is out of range")
    assert str(error).startswith(f"recipe.yaml:{position_of(EXAMPLE, 'use: noir', '{')[0]}:{position_of(EXAMPLE, 'use: noir', '{')[1]}: ")
    error = loaded.error(("nothing", "here"), "a top-level problem")
    assert str(error).startswith("recipe.yaml:1:1: nothing.here: a top-level problem.")


def test_loaded_recipe_errors_reports_several_sorted(tmp_path):
    loaded = load_recipe(write(tmp_path, EXAMPLE))
    error = loaded.errors([(("targets", "neon-noir", "base"), "second", ""), (("name",), "first", "")])
    assert str(error).splitlines()[1:] == [
        "recipe.yaml:2:1: name: first.",
        f"recipe.yaml:{position_of(EXAMPLE, 'base: base', 'base')[0]}:5: targets.neon-noir.base: second.",
    ]


def test_field_paths_bracket_names_that_contain_dots(tmp_path):
    text = MINIMAL.replace("  style: {source: style.safetensors}", "  v1.5: {source: 'ftp://x/y.safetensors'}").replace("use: style", "use: v1.5")
    error = load_error(tmp_path, text)
    line = assert_points_at(error, "recipe.yaml", *position_of(text, "v1.5: {", "source"), "inputs['v1.5'].source")
    assert "unsupported scheme 'ftp'" in line
