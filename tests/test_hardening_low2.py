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


# --- two recipes in one folder writing one output ----------------------------------------------------


def _second_recipe(root, strength: str = "0.2", output: str = "    output: dist/baked.safetensors\n"):
    text = (root / "recipe.yaml").read_text().replace("strength: 0.7", f"strength: {strength}")
    (root / "other.yaml").write_text(text.replace(BAKED, BAKED + output))
    return root / "other.yaml"


def test_a_recipe_does_not_overwrite_another_recipes_output(tmp_path, models):
    root = make_project(tmp_path / "project", models)
    other = _second_recipe(root)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output
    before = snapshot(root)
    code, output = run_cli("build", other, "-q")
    assert_clear_refusal(code, output, [
        f"{other}:11", "targets.baked.output", "would replace dist/baked.safetensors, which the recipe recipe.yaml in the same folder wrote",
        "give each recipe its own output path (output: in other.yaml or in recipe.yaml)",
        "loraforge build --force other.yaml baked"])
    _one_paragraph(output)
    assert snapshot(root) == before  # the output, recipe.lock untouched; no other.lock
    # --force replaces it; now recipe.yaml's build is refused the same way, naming other.yaml
    code, output = run_cli("build", other, "--force", "-q")
    assert code == 0, output
    assert (root / "other.lock").is_file()
    before = snapshot(root)
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert_clear_refusal(code, output, [f"{root / 'recipe.yaml'}:9", "targets.baked", "which the recipe other.yaml in the same folder wrote",
                                        "loraforge build --force recipe.yaml baked"])
    assert snapshot(root) == before


def test_recipes_with_their_own_outputs_and_rebuilds_of_ones_own_output_go_on(tmp_path, models):
    root = make_project(tmp_path / "project", models)
    other = _second_recipe(root, output="    output: dist/other.safetensors\n")
    for recipe in (root / "recipe.yaml", other, root / "recipe.yaml", other):
        code, output = run_cli("build", recipe, "-q")
        assert code == 0, output
    (root / OUTPUT).write_bytes(b"damaged")  # a rebuild of one's own output is not refused
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output


RELEASE = "  bundle:\n    kind: release\n    include: [baked]\n"


def test_a_recipe_does_not_overwrite_another_recipes_bundle(tmp_path, models):
    root = make_project(tmp_path / "project", models)
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe.read_text() + RELEASE + "    output: dist/bundle\n")
    other = root / "other.yaml"
    other.write_text(recipe.read_text().replace("strength: 0.7", "strength: 0.2").replace(BAKED, BAKED + "    output: dist/other.safetensors\n"))
    code, output = run_cli("build", recipe, "-q")
    assert code == 0, output
    (root / "recipe.lock").unlink()  # the manifest alone names the recipe that wrote the bundle
    before = snapshot(root)
    code, output = run_cli("build", other, "-q")
    assert_clear_refusal(code, output, ["targets.bundle.output", "would replace dist/bundle, which the recipe recipe.yaml",
                                        "loraforge build --force other.yaml bundle"])
    after = snapshot(root)
    changed = {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)}
    assert changed <= {"project/dist/other.safetensors", "project/other.lock"}, changed  # its own target, built first


# --- a recipe file named like a bundle's own files ----------------------------------------------------


@pytest.mark.parametrize("file_name", ["README.md", "manifest.json", "readme.md"])
@pytest.mark.parametrize("command", ["plan", "build"])
def test_a_recipe_named_like_a_bundles_own_file_is_refused(tmp_path, models, file_name, command):
    root = make_project(tmp_path / "project", models)
    recipe = root / file_name
    recipe.write_text((root / "recipe.yaml").read_text() + RELEASE)
    (root / "recipe.yaml").unlink()
    before = snapshot(root)
    code, output = run_cli(command, recipe)
    reserved = "README.md" if file_name.casefold() == "readme.md" else file_name
    assert_clear_refusal(code, output, [f"{recipe}:14", "targets.bundle", f"would copy the recipe file {file_name} into the bundle",
                                        f"the bundle's own {reserved}", "rename the recipe file, e.g. to recipe.yaml"])
    _one_paragraph(output)
    assert snapshot(root) == before


def test_a_recipe_with_another_name_bundles_itself(tmp_path, models):
    root = make_project(tmp_path / "project", models)
    recipe = root / "README.yaml"
    recipe.write_text((root / "recipe.yaml").read_text() + RELEASE)
    code, output = run_cli("build", recipe, "-q")
    assert code == 0, output
    assert (root / "dist/bundle/README.yaml").read_bytes() == recipe.read_bytes()


# --- EMA copies left unbaked ----------------------------------------------------------------------


def _with_ema_copies(path, count: int) -> list[str]:
    """The base with SD 1.x-style EMA copies (model_ema.<key without model. and dots>) of its first ``count`` UNet weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    unet = sorted(key for key in tensors if key.startswith("model.diffusion_model."))[:count]
    ema = {"model_ema." + key[len("model."):].replace(".", ""): tensors[key].clone() for key in unet}
    save_file({**tensors, **ema}, path, metadata=metadata)
    return sorted(ema)


def test_plan_warns_about_ema_copies_a_bake_leaves_as_they_are(tmp_path, models):
    import json

    from safetensors import safe_open

    root = make_project(tmp_path / "project", models)
    ema = _with_ema_copies(root / "models/base.safetensors", 5)
    before = snapshot(root)
    code, output = run_cli("plan", root / "recipe.yaml")
    assert code == 0, output
    assert "Traceback" not in output
    message = " ".join(output.split())
    assert "warning: 5 EMA tensors (model_ema.*) left as they are: the LoRA is baked into model.diffusion_model.* only" in message, output
    code, output = run_cli("plan", root / "recipe.yaml", "--json")
    assert code == 0, output
    assert json.loads(output)["targets"][0]["ema_tensors_left"] == 5
    assert snapshot(root) == before  # plan writes nothing
    code, output = run_cli("build", root / "recipe.yaml", "-q")
    assert code == 0, output  # a warning, not an error
    with safe_open(root / "models/base.safetensors", "pt") as base, safe_open(root / OUTPUT, "pt") as out:
        for key in ema:  # left as they are (converted to the save dtype like every tensor)
            assert out.get_tensor(key).equal(base.get_tensor(key).to(out.get_tensor(key).dtype)), key


def test_plan_says_nothing_about_ema_for_a_base_without_copies(tmp_path, models):
    import json

    root = make_project(tmp_path / "project", models)
    code, output = run_cli("plan", root / "recipe.yaml")
    assert code == 0, output
    assert "EMA" not in output
    code, output = run_cli("plan", root / "recipe.yaml", "--json")
    assert "ema_tensors_left" not in json.loads(output)["targets"][0]


# --- planning speed: a header is validated once per process ------------------------------------------


def test_planning_many_targets_validates_each_header_once(tmp_path, models, monkeypatch):
    """Planning opened the base and the adapter about six times per target, parsing and checking every tensor
    entry each time (the largest cost of `plan`, ~60% of 60 targets); a header seen before is now taken from a
    memo keyed by its bytes and the file's size. The plan is the same."""
    import json

    from loraforge.formats import safetensors_reader

    root = make_project(tmp_path / "project", models)
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe.read_text() + "".join(
        f"  t{i}:\n    kind: checkpoint\n    base: base\n    loras:\n      - {{use: style, strength: 0.{i + 1}}}\n" for i in range(8)))
    checked = []
    original = safetensors_reader.SafetensorsFile._check_entry
    monkeypatch.setattr(safetensors_reader.SafetensorsFile, "_check_entry",
                        lambda self, name, entry, size: checked.append(self.path.name) or original(self, name, entry, size))
    safetensors_reader._VALIDATED_HEADERS.clear()
    code, output = run_cli("plan", recipe, "--json")
    assert code == 0, output
    plan = json.loads(output)
    assert len(plan["targets"]) == 9
    from safetensors import safe_open

    sizes = {}
    for name in ("base.safetensors", "style.safetensors"):
        with safe_open(root / "models" / name, "np") as f:
            sizes[name] = len(list(f.keys()))
    assert {name: checked.count(name) for name in sizes} == sizes  # each entry checked once, not once per open
    checked.clear()
    safetensors_reader._VALIDATED_HEADERS.clear()
    monkeypatch.setattr(safetensors_reader, "MEMO_HEADERS", 0)  # no memo: the same plan, the same bytes
    code, again = run_cli("plan", recipe, "--json")
    assert code == 0 and again == output
    assert checked.count("base.safetensors") > 9 * sizes["base.safetensors"]


def test_a_file_changed_under_the_memo_is_validated_again(tmp_path, models):
    """The memo is keyed by the header's bytes as read now: a damaged header of the same size is refused."""
    root = make_project(tmp_path / "project", models)
    code, output = run_cli("plan", root / "recipe.yaml")
    assert code == 0, output
    base = root / "models/base.safetensors"
    data = bytearray(base.read_bytes())
    at = data.index(b'"data_offsets":[') + len(b'"data_offsets":[')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")  # same length, offsets now wrong
    base.write_bytes(bytes(data))
    code, output = run_cli("inspect", base)
    assert code != 0 and "is not a valid safetensors file" in " ".join(output.split()), output
    assert "Traceback" not in output


# --- a low ulimit -v --------------------------------------------------------------------------------

OUT_OF_MEMORY = """
import re, resource, sys
from loraforge.cli import app
size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
sys.argv = ["loraforge", *sys.argv[2:]]
app()
"""


@pytest.mark.parametrize(("command", "headroom_mib"), [("plan", 4), ("plan", 16), ("build", 4), ("build", 16), ("build", 64), ("build", 200)])
def test_a_low_address_space_limit_is_one_paragraph(tmp_path, models, command, headroom_mib):
    """`ulimit -v` a few MiB to a few hundred MiB above what the interpreter holds: a MemoryError (or a shared
    library that cannot be mapped) wherever it strikes, loading torch included, ends in one paragraph, exit 2.
    (An abort inside a native library, OpenBLAS or a C++ std::bad_alloc, is out of Python's reach: docs/security.md.)"""
    import os
    import subprocess
    import sys

    root = make_project(tmp_path / "project", models)
    before = snapshot(root)
    env = {**os.environ, "LORAFORGE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, str(headroom_mib), command, str(root / "recipe.yaml"), "-q"],
                            capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert_clear_refusal(result.returncode, output, ["loraforge ran out of memory", "an address-space limit (ulimit -v) of",
                                                     "Fix: raise the limit (ulimit -v unlimited"])
    _one_paragraph(output)
    assert snapshot(root) == before
