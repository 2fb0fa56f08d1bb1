"""Release bundles (`kind: release`, `loraforge release`): manifest numbers, model card, determinism, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import RecipeError
from loraforge.build import plan_build
from loraforge.recipe.loader import load_recipe

runner = CliRunner()
MODELS = Path(__file__).resolve().parents[1] / "recipes" / "models"

RECIPE = """\
loraforge: 1
name: neon-pack
title: Neon Pack
description: Two LoRAs merged exactly, and baked into the tiny base.
date: "2026-11-01"
precision: {save: float16}

inputs:
  base: {source: models/tiny-sd15-base.safetensors}
  neon: {source: models/neon-lora.safetensors}
  noir: {source: models/noir-locon.safetensors}

targets:
  neon-noir-lora:
    kind: lora
    method: concat
    loras:
      - {use: neon, strength: 0.8, te: 0.5, blocks: OUTD}
      - {use: noir, strength: -0.3, blocks: {default: 1, IN00-IN03: 0, OUT09-OUT11: 0.5}}
  neon-noir:
    kind: checkpoint
    base: base
    loras:
      - {use: neon-noir-lora, strength: 0.75}
  pack:
    kind: release
    description: The pack, with its model card.
"""


def _project(folder: Path, recipe: str = RECIPE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models").symlink_to(MODELS, target_is_directory=True)
    (folder / "recipe.yaml").write_text(recipe)
    return folder


def _invoke(*args) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    return result


def _build(project: Path, *extra) -> str:
    result = _invoke("build", project / "recipe.yaml", "-q", *extra)
    assert result.exit_code == 0, result.output
    return result.output


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_sha256(path: Path) -> str:
    """The safetensors data section's sha256, computed here from the format (8-byte LE header length)."""
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[8 + header:]).hexdigest()


def _copy_of(built: Path, folder: Path) -> Path:
    """A copy of a built project (outputs, lock and bundle), so a test rebuilds only what it changes."""
    shutil.copytree(built, folder, symlinks=True)
    return folder


def _bundle_hashes(folder: Path) -> dict[str, str]:
    return {path.name: _sha256(path) for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One project built once (tests below read it and must not change it)."""
    project = _project(tmp_path_factory.mktemp("release") / "project")
    _build(project)
    return project


# --- manifest -----------------------------------------------------------------------


def test_bundle_holds_the_outputs_reports_recipe_lock_card_and_manifest(built):
    folder = built / "dist" / "pack"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "manifest.json", "neon-noir-lora.merge.json", "neon-noir-lora.safetensors",
        "neon-noir.safetensors", "recipe.lock", "recipe.yaml",
    ]
    for name in ("neon-noir-lora.safetensors", "neon-noir.safetensors", "neon-noir-lora.merge.json"):
        assert (folder / name).read_bytes() == (built / "dist" / name).read_bytes()
    assert (folder / "recipe.yaml").read_bytes() == (built / "recipe.yaml").read_bytes()
    assert not any(p.name.startswith(".") for p in (built / "dist").iterdir())  # no temp folder left


def test_manifest_numbers_match_hashlib(built):
    folder = built / "dist" / "pack"
    text = (folder / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"  # canonical form
    assert manifest["format"] == "loraforge-release/1" and manifest["release"] == "pack"
    assert manifest["description"] == "The pack, with its model card." and manifest["date"] == "2026-11-01"
    assert [o["target"] for o in manifest["outputs"]] == ["neon-noir-lora", "neon-noir"]
    for output in manifest["outputs"]:
        path = folder / output["file"]
        whole, data = _sha256(path), _data_sha256(path)
        assert output["size"] == path.stat().st_size
        assert output["sha256"] == whole and output["autov2"] == whole[:10]
        assert output["data_sha256"] == data and output["autov3"] == data[:12]
    assert manifest["outputs"][0]["report"] == "neon-noir-lora.merge.json"
    inputs = {i["name"]: i for i in manifest["inputs"]}
    assert sorted(inputs) == ["base", "neon", "noir"]
    for name, entry in inputs.items():
        source = MODELS / Path(entry["source"]).name
        assert entry["sha256"] == _sha256(source) and entry["size"] == source.stat().st_size
        assert entry["data_sha256"] == _data_sha256(source)
        assert entry["resolved"] == {"path": entry["source"]}
    listed = {f["file"]: f for f in manifest["files"]}
    assert sorted(listed) == sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    for name, entry in listed.items():
        assert entry["sha256"] == _sha256(folder / name) and entry["size"] == (folder / name).stat().st_size
    recipe = manifest["recipe"]
    assert recipe["yaml"] == RECIPE and recipe["file"] == "recipe.yaml" and recipe["lock"] == "recipe.lock"
    assert recipe["canonical"]["targets"]["neon-noir"]["loras"][0]["strength"] == 0.75
    assert manifest["numeric_policy"]["bake"].startswith("bake-")


def test_bundled_lock_records_the_bundled_targets_and_their_inputs(built):
    folder = built / "dist" / "pack"
    lock = json.loads((folder / "recipe.lock").read_text())
    assert sorted(lock["targets"]) == ["neon-noir", "neon-noir-lora"]  # not the release itself
    assert sorted(lock["inputs"]) == ["base", "neon", "noir"]
    recipe_lock = json.loads((built / "recipe.lock").read_text())
    for name, entry in lock["targets"].items():
        assert entry == recipe_lock["targets"][name]
        assert entry["sha256"] == _sha256(folder / Path(entry["output"]).name)
    assert recipe_lock["targets"]["pack"]["sha256"] == _sha256(folder / "manifest.json")
    assert recipe_lock["targets"]["pack"]["output"] == "dist/pack/manifest.json"


def test_no_absolute_path_or_machine_name_in_the_texts(built):
    folder = built / "dist" / "pack"
    for name in ("manifest.json", "README.md", "recipe.lock"):
        text = (folder / name).read_text()
        assert str(built) not in text and str(MODELS) not in text and os.uname().nodename not in text


# --- model card -------------------------------------------------------------------------


def test_model_card_shows_recipe_values_and_hashes(built):
    folder = built / "dist" / "pack"
    card = (folder / "README.md").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    # The Hub's metadata first (docs/publishing.md), then the card itself.
    assert card.startswith("---\npipeline_tag: text-to-image\ntags:\n- stable-diffusion\n- lora\n- stable-diffusion-v1\n")
    assert "\n---\n\n# Neon Pack\n\nThe pack, with its model card.\n" in card
    assert "| Date | 2026-11-01 |" in card
    # The ingredients tables carry strengths, te and block weights exactly as written in the recipe.
    assert "| 1 | `neon` | `models/neon-lora.safetensors` | 0.8 | 0.5 | `OUTD` |" in card
    assert "| 2 | `noir` | `models/noir-locon.safetensors` | -0.3 | -0.3 | `default: 1, IN00-IN03: 0, OUT09-OUT11: 0.5` |" in card
    assert "| 1 | `neon-noir-lora` | output of target `neon-noir-lora` | 0.75 | 0.75 | all 1 |" in card
    base_sha = _sha256(MODELS / "tiny-sd15-base.safetensors")
    assert f"| `neon-noir` | base | `base` | `models/tiny-sd15-base.safetensors` | `{base_sha}` |" in card
    for output in manifest["outputs"]:
        assert f"`{output['sha256']}` | `{output['autov2']}` | `{output['data_sha256']}` ({output['autov3']})" in card
    assert "loraforge build recipe.yaml --locked\nloraforge verify recipe.yaml\n" in card


# --- determinism ------------------------------------------------------------------------------


def _build_in_subprocess(project: Path, threads: str, hashseed: str, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONHASHSEED": hashseed,
           "LORAFORGE_CACHE": str(cache)}
    code = "import torch, sys; torch.set_num_threads(int(sys.argv[1])); from loraforge.cli import app; app(sys.argv[2:])"
    return subprocess.Popen([sys.executable, "-c", code, threads, "build", str(project / "recipe.yaml"), "-q"],
                            env=env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_bundle_is_byte_identical_across_processes_threads_hash_seeds_and_folders(tmp_path):
    first = _project(tmp_path / "one" / "project")
    second = _project(tmp_path / "elsewhere" / "deeper" / "project")
    # Side by side: each process's bytes must not depend on the other, nor on the machine being busy.
    builds = [_build_in_subprocess(first, "1", "1", tmp_path / "cache-1"),
              _build_in_subprocess(second, "3", "4242", tmp_path / "cache-2")]
    for build in builds:
        output, _ = build.communicate(timeout=300)
        assert build.returncode == 0, output.decode()
    hashes = _bundle_hashes(first / "dist" / "pack")
    assert hashes == _bundle_hashes(second / "dist" / "pack")
    assert len(hashes) == 7


def test_copied_bundle_equals_hard_linked_bundle(tmp_path, built, monkeypatch):
    """Another filesystem (no hard links) gives the same bytes."""
    project = _copy_of(built, tmp_path / "project")
    shutil.rmtree(project / "dist" / "pack")

    def no_links(source, destination):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("loraforge.execute.release.os.link", no_links)
    _build(project)
    folder = project / "dist" / "pack"
    assert _bundle_hashes(folder) == _bundle_hashes(built / "dist" / "pack")
    assert os.stat(folder / "neon-noir.safetensors").st_ino != os.stat(project / "dist/neon-noir.safetensors").st_ino


# --- incremental and atomic --------------------------------------------------------------------


def test_second_build_reports_the_release_up_to_date_and_writes_nothing(tmp_path, built):
    project = _copy_of(built, tmp_path / "project")
    manifest = project / "dist" / "pack" / "manifest.json"
    before = (manifest.stat().st_mtime_ns, manifest.stat().st_ino)
    output = _build(project)
    assert "pack" in output and "up to date" in output
    assert (manifest.stat().st_mtime_ns, manifest.stat().st_ino) == before
    # A release-only edit (its description) rebuilds the bundle, not the targets it holds.
    recipe = project / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("with its model card.", "now with a new card."))
    lora = project / "dist" / "neon-noir-lora.safetensors"
    lora_mtime = lora.stat().st_mtime_ns
    _build(project)
    assert lora.stat().st_mtime_ns == lora_mtime
    assert "now with a new card." in (project / "dist/pack/README.md").read_text()
    assert json.loads(manifest.read_text())["description"] == "The pack, with its model card.".replace(
        "with its model card.", "now with a new card.")


@pytest.mark.parametrize("damage", ["delete", "edit"])
def test_a_bundle_file_deleted_or_edited_by_hand_makes_the_release_stale(tmp_path, built, damage):
    project = _copy_of(built, tmp_path / "project")
    folder = project / "dist" / "pack"
    expected = _bundle_hashes(folder)
    card = folder / "README.md"
    if damage == "delete":
        card.unlink()
    else:
        card.write_text(card.read_text() + "edited\n")
    assert "built pack" in _build(project)  # manifest.json alone still matches the lock
    assert _bundle_hashes(folder) == expected


def _stale_release(tmp_path, built) -> tuple[Path, dict[str, str]]:
    """A built project whose release is then made stale (new description); returns the old bundle's hashes."""
    project = _copy_of(built, tmp_path / "project")
    old = _bundle_hashes(project / "dist" / "pack")
    recipe = project / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("with its model card.", "changed."))
    return project, old


def _leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in (project / "dist").iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_interrupted_bundle_leaves_the_previous_bundle_and_no_temp_folder(tmp_path, built, monkeypatch, interrupt):
    project, old = _stale_release(tmp_path, built)

    def fail(contents):
        raise interrupt("stopped while writing the card")

    monkeypatch.setattr("loraforge.execute.release.model_card", fail)
    with pytest.raises(interrupt):
        from loraforge.execute.build import run_build

        run_build(plan_build(load_recipe(project / "recipe.yaml")))
    assert _bundle_hashes(project / "dist" / "pack") == old
    assert _leftovers(project) == []
    monkeypatch.undo()
    _build(project)  # the next build finishes the work
    assert "changed." in (project / "dist/pack/README.md").read_text()


def test_failed_swap_puts_the_previous_bundle_back(tmp_path, built, monkeypatch):
    project, old = _stale_release(tmp_path, built)
    real_rename = os.rename
    calls = []

    def rename(source, destination):
        calls.append(Path(destination).name)
        if len(calls) == 2:  # the new bundle moving in
            raise KeyboardInterrupt
        real_rename(source, destination)

    monkeypatch.setattr("loraforge.execute.release.os.rename", rename)
    from loraforge.execute.build import run_build

    with pytest.raises(KeyboardInterrupt):
        run_build(plan_build(load_recipe(project / "recipe.yaml")))
    assert calls[0].startswith(f".pack.old-{os.getpid()}-") and calls[1] == "pack"
    assert _bundle_hashes(project / "dist" / "pack") == old
    assert _leftovers(project) == []


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path, built):
    project = _copy_of(built, tmp_path / "project")
    shutil.rmtree(project / "dist" / "pack")
    mine = project / "dist" / "pack" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own notes")
    result = _invoke("build", project / "recipe.yaml", "-q")
    assert result.exit_code == 2
    assert "no loraforge manifest.json" in result.output and "refuses to delete" in result.output
    assert mine.read_text() == "my own notes"
    assert _leftovers(project) == []


# --- recipe and plan errors ------------------------------------------------------------------------


def _load_error(tmp_path, release: str) -> str:
    project = _project(tmp_path / "project", RECIPE.replace("  pack:\n    kind: release\n    description: The pack, with its model card.\n", release))
    with pytest.raises(RecipeError) as caught:
        plan_build(load_recipe(project / "recipe.yaml"))
    return str(caught.value)


@pytest.mark.parametrize("release, expected", [
    ("  pack:\n    kind: release\n    include: [neon-noir, neon]\n",
     "recipe.yaml:27:26: targets.pack.include[1]: 'neon' is an input; a release bundles outputs of targets"),
    ("  pack:\n    kind: release\n    include: [neon-noir, nope]\n",
     "recipe.yaml:27:26: targets.pack.include[1]: there is no target named 'nope'"),
    ("  pack:\n    kind: release\n  pack2:\n    kind: release\n    include: [pack]\n",
     "recipe.yaml:29:15: targets.pack2.include[0]: 'pack' is a release; a release cannot contain another release"),
    ("  pack:\n    kind: release\n    output: dist\n",
     "recipe.yaml:27:5: targets.pack.output: the release folder 'dist' overlaps the output of target 'neon-noir-lora'"),
    ("  pack:\n    kind: release\n    output: dist/pack.safetensors\n",
     "recipe.yaml:27:5: targets.pack.output: a release is a folder"),
])
def test_release_errors_point_at_the_recipe_line(tmp_path, release, expected):
    message = _load_error(tmp_path, release)
    assert expected in message, message
    assert "Fix:" in message


def test_two_outputs_with_one_file_name_cannot_share_a_bundle(tmp_path):
    recipe = RECIPE.replace("  neon-noir:\n    kind: checkpoint\n", "  neon-noir:\n    kind: checkpoint\n    output: other/neon-noir-lora.safetensors\n")
    project = _project(tmp_path / "project", recipe)
    with pytest.raises(RecipeError, match="would hold two files named 'neon-noir-lora.safetensors'"):
        plan_build(load_recipe(project / "recipe.yaml"))


# --- the release command ---------------------------------------------------------------------------


WITHOUT_RELEASE = RECIPE.split("  pack:\n")[0]


def test_release_command_bundles_every_target_of_a_recipe_without_a_release(tmp_path, built):
    project = _copy_of(built, tmp_path / "project")
    (project / "recipe.yaml").write_text(WITHOUT_RELEASE)
    result = _invoke("release", project / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    folder = project / "dist" / "release"
    assert "built release" in result.output and str(folder) in result.output
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["release"] == "release" and manifest["description"] == "Two LoRAs merged exactly, and baked into the tiny base."
    assert [o["target"] for o in manifest["outputs"]] == ["neon-noir-lora", "neon-noir"]
    for output in manifest["outputs"]:  # the same outputs as the recipe's own release bundled
        assert (folder / output["file"]).read_bytes() == (built / "dist" / "pack" / output["file"]).read_bytes()
    again = _invoke("release", project / "recipe.yaml", "-q")
    assert again.exit_code == 0 and "up to date release" in again.output and "built" not in again.output


def test_release_command_output_folder(tmp_path, built, monkeypatch):
    project = _copy_of(built, tmp_path / "project")
    monkeypatch.chdir(project)
    result = _invoke("release", "recipe.yaml", "-q", "--output", "public/v1")
    assert result.exit_code == 0, result.output
    assert (project / "public/v1/manifest.json").is_file() and not (project / "public/v1/.tmp").exists()
    assert json.loads((project / "recipe.lock").read_text())["targets"]["pack"]["output"] == "public/v1/manifest.json"
    outside = _invoke("release", "recipe.yaml", "-q", "--output", str(tmp_path / "elsewhere"))
    assert outside.exit_code == 2 and "outside the recipe's folder" in outside.output
    assert not (tmp_path / "elsewhere").exists()


def test_release_command_runs_the_recipe_release_only(tmp_path, built):
    """With a release target, `release` builds it (and what it includes), nothing else."""
    recipe = RECIPE.replace("  pack:\n    kind: release\n", "  extra:\n    kind: lora\n    method: concat\n    loras: [{use: neon}]\n  pack:\n    kind: release\n    include: [neon-noir]\n")
    project = _copy_of(built, tmp_path / "project")
    (project / "recipe.yaml").write_text(recipe)
    result = _invoke("release", project / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert not (project / "dist" / "extra.safetensors").exists()
    assert sorted(p.name for p in (project / "dist" / "pack").iterdir()) == [
        "README.md", "manifest.json", "neon-noir.safetensors", "recipe.lock", "recipe.yaml"]
    assert "## Ingredients" in (project / "dist/pack/README.md").read_text()


def test_example_recipe_rebuilds_its_locked_bundle(tmp_path):
    """recipes/release.yaml with its committed lock: `build --locked` in a copy gives the locked bundle."""
    recipes = MODELS.parent
    for name in ("release.yaml", "release.lock"):
        shutil.copy(recipes / name, tmp_path / name)
    (tmp_path / "models").symlink_to(MODELS, target_is_directory=True)
    result = _invoke("build", tmp_path / "release.yaml", "-q", "--locked")
    assert result.exit_code == 0, result.output
    lock = json.loads((recipes / "release.lock").read_text())
    folder = tmp_path / "dist" / "neon-noir-v1.2"
    assert _sha256(folder / "manifest.json") == lock["targets"]["neon-noir-v1.2"]["sha256"]
    assert (folder / "release.lock").read_bytes() != (recipes / "release.lock").read_bytes()  # cut to the bundled targets
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: cc0-1.0\n") and "\n---\n\n# Neon Noir v1.2\n" in card and "| 1 | `neon` | `models/neon-lora.safetensors` | 0.8 | 0.5 | `OUTD` |" in card


def test_plan_shows_the_release_node(tmp_path, built):
    fresh = _invoke("plan", _project(tmp_path / "fresh") / "recipe.yaml", "--json")
    assert fresh.exit_code == 0, fresh.output
    release = json.loads(fresh.output)["targets"][-1]
    assert release["kind"] == "release" and release["status"] == "waiting" and release["action_key"] is None
    assert release["depends_on"] == ["neon-noir-lora", "neon-noir"] and release["inputs"] == ["base", "neon", "noir"]
    assert release["includes"][0] == {"target": "neon-noir-lora", "kind": "lora", "file": "neon-noir-lora.safetensors",
                                      "report": "neon-noir-lora.merge.json"}
    done = json.loads(_invoke("plan", built / "recipe.yaml", "--json").output)["targets"][-1]
    assert done["status"] == "up to date" and done["manifest"] == str(built / "dist/pack/manifest.json")
    tree = _invoke("plan", built / "recipe.yaml")
    assert "pack (release) up to date" in tree.output and "neon-noir (checkpoint): neon-noir.safetensors" in tree.output


# --- the pure text modules --------------------------------------------------------------------------


def _contents(recipe_text: str):
    """ReleaseContents for a recipe text, with made-up (but well-formed) file records."""
    import yaml

    from loraforge.recipe.schema import Recipe
    from loraforge.release.contents import BundledFile, BundledOutput, InputRecord, ReleaseContents

    recipe = Recipe.model_validate(yaml.safe_load(recipe_text))
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    outputs = tuple(
        BundledOutput(name, spec.kind, BundledFile(f"{name}.safetensors", 100 + i, digest(name), digest(name + "data")), digest("key" + name))
        for i, (name, spec) in enumerate(recipe.targets.items()) if spec.kind != "release"
    )
    inputs = tuple(InputRecord(name, spec.source, {"path": spec.source}, 10, digest(name)) for name, spec in sorted(recipe.inputs.items()))
    return ReleaseContents("pack", recipe, recipe_text, BundledFile("r.yaml", 1, digest("r")), BundledFile("r.lock", 2, digest("l")),
                           outputs, inputs, recipe.description, recipe.date, "9.9.9", {"bake": "policy"})


EXTRACT_RECIPE = """\
loraforge: 1
name: x
inputs: {tuned: {source: t.safetensors}, base: {source: b.safetensors}, style: {source: s.safetensors}}
targets:
  extracted: {kind: extract, tuned: tuned, base: base, rank: {energy: 0.9, max: 64}, conv_rank: 8}
  baked:
    kind: checkpoint
    base: tuned
    loras: [{use: extracted, strength: 0.125, blocks: [1, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1, 1]}, {use: style, te: 0}]
  pack: {kind: release, readme: false}
"""


def test_manifest_without_readme_lists_the_other_files_and_is_stable():
    from loraforge.release.manifest import manifest_text

    contents = _contents(EXTRACT_RECIPE)
    text = manifest_text(contents, None)
    manifest = json.loads(text)
    assert [f["file"] for f in manifest["files"]] == ["baked.safetensors", "extracted.safetensors", "r.lock", "r.yaml"]
    assert manifest["outputs"][0]["autov2"] == hashlib.sha256(b"extracted").hexdigest()[:10]
    assert manifest["outputs"][0]["autov3"] == hashlib.sha256(b"extracteddata").hexdigest()[:12]
    assert manifest["date"] is None and manifest["title"] == "x"
    assert text == manifest_text(_contents(EXTRACT_RECIPE), None)  # same records, same bytes


def test_model_card_for_an_extraction_and_a_block_weight_vector():
    from loraforge.release.card import model_card

    card = model_card(_contents(EXTRACT_RECIPE))
    assert "| Date | not set |" in card
    assert "LoRA extracted from `tuned` minus `base`: rank energy 0.9, max 64, conv rank 8, text encoder auto" in card
    tuned_sha = hashlib.sha256(b"tuned").hexdigest()
    assert f"| `extracted` | tuned | `tuned` | `t.safetensors` | `{tuned_sha}` |" in card
    assert f"| `baked` | base | `tuned` | `t.safetensors` | `{tuned_sha}` |" in card
    assert ("| 1 | `extracted` | output of target `extracted` | 0.125 | 0.125 | "
            "`1, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1, 1` |") in card
    assert "| 2 | `style` | `s.safetensors` | 1 | 0 | all 1 |" in card


def test_a_release_does_not_change_the_outputs_it_bundles(tmp_path):
    """A single-target recipe: `release` (which adds a release target) keeps build's output bytes and key."""
    recipe = WITHOUT_RELEASE.split("  neon-noir:\n")[0]  # only the concat LoRA
    project = _project(tmp_path / "project", recipe)
    _build(project)
    lora = project / "dist" / "neon-noir-lora.safetensors"
    built = (_sha256(lora), lora.stat().st_ino)
    result = _invoke("release", project / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert "up to date neon-noir-lora" in result.output
    assert (_sha256(lora), lora.stat().st_ino) == built
    assert _sha256(project / "dist" / "release" / lora.name) == built[0]
