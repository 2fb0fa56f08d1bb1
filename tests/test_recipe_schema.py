"""The schema: values, defaults, helpers and the canonical JSON of a recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraforge.recipe import CheckpointTarget, LoraUse, Precision, PrecisionOverride, Recipe, load_recipe
from test_recipe_helpers import EXAMPLE, MINIMAL, SHA, write


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_full_example_loads_with_the_written_values(tmp_path):
    loaded = load_recipe(write(tmp_path, EXAMPLE))
    recipe = loaded.recipe
    assert loaded.path == (tmp_path / "recipe.yaml").resolve()
    assert loaded.root == tmp_path.resolve()
    assert (recipe.loraforge, recipe.name, recipe.title) == (1, "neon-noir", "Neon Noir v1.2")
    assert (recipe.description, recipe.date, recipe.seed, recipe.device) == ("A moody merge.", "2026-11-01", 7, "auto")
    assert recipe.precision == Precision(compute="float32", save="float16")
    assert list(recipe.inputs) == ["base", "neon", "noir"]
    assert recipe.inputs["base"].sha256 == SHA  # uppercase hex is normalised
    assert recipe.inputs["neon"].source == "hf://org/repo@0123abc/neon.safetensors"
    assert recipe.inputs["noir"].sha256 is None

    target = recipe.targets["neon-noir"]
    assert isinstance(target, CheckpointTarget)
    assert (target.kind, target.base, target.allow_unmatched, target.device) == ("checkpoint", "base", False, "cpu")
    assert target.output == "dist/neon-noir.safetensors"
    assert target.loras == (
        LoraUse(use="neon", strength=0.8, te=0.5, blocks="OUTD"),
        LoraUse(use="noir", strength=-0.3),
    )
    assert [lora.te_strength for lora in target.loras] == [0.5, -0.3]


def test_minimal_recipe_gets_the_documented_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL)).recipe
    assert recipe.title == "tiny"  # defaults to the name
    assert (recipe.description, recipe.date, recipe.seed, recipe.device) == (None, None, 0, "auto")
    assert recipe.precision == Precision(compute="float32", save="same")
    target = recipe.targets["tiny-baked"]
    assert (target.allow_unmatched, target.output, target.precision, target.device) == (False, None, None, None)
    lora = target.loras[0]
    assert (lora.strength, lora.te, lora.blocks, lora.te_strength) == (1.0, None, None, 1.0)
    assert recipe.output_path("tiny-baked", tmp_path) == tmp_path / "dist" / "tiny-baked.safetensors"
    assert recipe.effective_device("tiny-baked") == "auto"
    assert recipe.effective_precision("tiny-baked") == Precision()


def test_per_target_overrides_merge_field_by_field(tmp_path):
    recipe = load_recipe(write(tmp_path, EXAMPLE)).recipe
    assert recipe.effective_precision("neon-noir") == Precision(compute="float32", save="bfloat16")
    assert recipe.effective_device("neon-noir") == "cpu"
    assert recipe.output_path("neon-noir", tmp_path) == tmp_path / "dist/neon-noir.safetensors"

    top = Precision(compute="float64", save="float16")
    assert top.merged_with(None) == top
    assert top.merged_with(PrecisionOverride()) == top
    assert top.merged_with(PrecisionOverride(save="float32")) == Precision(compute="float64", save="float32")
    assert top.merged_with(PrecisionOverride(compute="float32")) == Precision(compute="float32", save="float16")


def test_ratio_is_an_alias_of_strength(tmp_path):
    text = EXAMPLE.replace("{use: noir, strength: -0.3}", "{use: noir, ratio: -0.3}")
    recipe = load_recipe(write(tmp_path, text)).recipe
    assert recipe.targets["neon-noir"].loras[1].strength == -0.3
    assert recipe.canonical_json() == load_recipe(write(tmp_path, EXAMPLE, "b.yaml")).recipe.canonical_json()


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("OUTD", "OUTD"),
        ('"1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"', "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
        ("[1, 0, 0.5]", (1.0, 0.0, 0.5)),
        ('{default: 0, IN04: 0.5, "OUT03-OUT06": 1}', {"default": 0.0, "IN04": 0.5, "OUT03-OUT06": 1.0}),
    ],
)
def test_block_specs_are_kept_raw(tmp_path, written, kept):
    recipe = load_recipe(write(tmp_path, EXAMPLE.replace("blocks: OUTD", f"blocks: {written}"))).recipe
    blocks = recipe.targets["neon-noir"].loras[0].blocks
    assert blocks == kept
    assert type(blocks) is type(kept)


def test_dependencies_in_recipe_order_without_repeats(tmp_path):
    text = EXAMPLE.replace("{use: noir, strength: -0.3}", "{use: noir, strength: -0.3}\n      - {use: neon, strength: 0.1}")
    recipe = load_recipe(write(tmp_path, text)).recipe
    assert recipe.dependencies("neon-noir") == ("base", "neon", "noir")


def test_unquoted_date_is_accepted_and_impossible_dates_are_not(tmp_path):
    recipe = load_recipe(write(tmp_path, EXAMPLE.replace('date: "2026-11-01"', "date: 2026-11-01"))).recipe
    assert recipe.date == "2026-11-01"
    with pytest.raises(ValidationError):
        Recipe.model_validate({**_example_data(), "date": "2026-02-30"})


def test_models_are_frozen_and_forbid_unknown_fields():
    recipe = Recipe.model_validate(_example_data())
    with pytest.raises(ValidationError):
        recipe.seed = 3
    with pytest.raises(ValidationError):
        LoraUse.model_validate({"use": "x", "weight": 1})


@pytest.mark.parametrize("number", [1, 1.0, 2**40])
def test_integer_and_float_strengths_are_the_same_float(number):
    lora = LoraUse.model_validate({"use": "x", "strength": number})
    assert lora.strength == float(number) and type(lora.strength) is float


@pytest.mark.parametrize("seed", [-1, True, "3", 1.5, 2**63])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(ValidationError):
        Recipe.model_validate({**_example_data(), "seed": seed})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices(device):
    assert Recipe.model_validate({**_example_data(), "device": device}).device == device


@pytest.mark.parametrize("output", ["dist/a.ckpt", "", 3])
def test_bad_outputs_are_refused(output):
    data = _example_data()
    data["targets"]["neon-noir"]["output"] = output
    with pytest.raises(ValidationError):
        Recipe.model_validate(data)


def test_allow_unmatched_must_be_a_real_boolean():
    data = _example_data()
    data["targets"]["neon-noir"]["allow_unmatched"] = "false"
    with pytest.raises(ValidationError):
        Recipe.model_validate(data)


# --- canonical JSON ----------------------------------------------------------------

REORDERED = """\
# same recipe: other key order, flow/block style swapped, comments, 1 vs 1.0
targets:
  neon-noir:
    device: cpu
    precision:
      save: bfloat16
    loras:
      - {blocks: OUTD, te: 0.50, strength: 0.8, use: neon}
      - use: noir      # a comment
        ratio: -0.30
    base: base
    kind: checkpoint
inputs:
  noir:  {source: "civitai:123456"}
  neon:  {source: 'hf://org/repo@0123abc/neon.safetensors'}
  base:
    sha256: 0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789ABCDEF
    source: models/base.safetensors
precision: {save: float16}
device: auto
seed: 7
date: 2026-11-01
description: "A moody merge."
title: 'Neon Noir v1.2'
name: neon-noir
loraforge: 1
"""


def test_canonical_json_ignores_order_style_comments_and_defaults(tmp_path):
    first = load_recipe(write(tmp_path, EXAMPLE, "a.yaml")).recipe.canonical_json()
    second = load_recipe(write(tmp_path, REORDERED, "b.yaml")).recipe.canonical_json()
    assert first == second


def test_canonical_json_is_compact_sorted_and_complete(tmp_path):
    text = load_recipe(write(tmp_path, MINIMAL)).recipe.canonical_json()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert data == {
        "loraforge": 1,
        "name": "tiny",
        "title": "tiny",
        "description": None,
        "date": None,
        "seed": 0,
        "device": "auto",
        "precision": {"compute": "float32", "save": "same"},
        "inputs": {
            "base": {"source": "base.safetensors", "sha256": None, "allow_pickle": False},
            "style": {"source": "style.safetensors", "sha256": None, "allow_pickle": False},
        },
        "targets": {
            "tiny-baked": {
                "kind": "checkpoint",
                "base": "base",
                "loras": [{"use": "style", "strength": 1.0, "te": None, "blocks": None}],
                "allow_unmatched": False,
                "output": "dist/tiny-baked.safetensors",
                "precision": None,
                "device": None,
            }
        },
    }


def test_canonical_json_changes_when_a_strength_changes(tmp_path):
    first = load_recipe(write(tmp_path, EXAMPLE, "a.yaml")).recipe.canonical_json()
    changed = load_recipe(write(tmp_path, EXAMPLE.replace("strength: -0.3", "strength: -0.31"), "b.yaml")).recipe.canonical_json()
    assert first != changed
    assert json.loads(changed)["targets"]["neon-noir"]["loras"][1]["strength"] == -0.31


def test_canonical_json_is_stable_across_processes_and_hash_seeds(tmp_path):
    path = tmp_path / write(tmp_path, EXAMPLE)
    script = "import sys; from loraforge.recipe import load_recipe; sys.stdout.write(load_recipe(sys.argv[1]).recipe.canonical_json())"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed, "PATH": ""}
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert outputs == {load_recipe(path).recipe.canonical_json()}


def _example_data() -> dict:
    return {
        "loraforge": 1,
        "name": "neon-noir",
        "inputs": {"base": {"source": "models/base.safetensors"}, "neon": {"source": "neon.safetensors"}},
        "targets": {"neon-noir": {"kind": "checkpoint", "base": "base", "loras": [{"use": "neon"}]}},
    }


def test_output_path_keeps_absolute_outputs(tmp_path):
    data = _example_data()
    data["targets"]["neon-noir"]["output"] = str(tmp_path / "abs.safetensors")
    assert Recipe.model_validate(data).output_path("neon-noir", Path("/elsewhere")) == tmp_path / "abs.safetensors"
