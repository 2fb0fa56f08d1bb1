"""End-to-end CLI tests on tiny models: build, plan, inspect and their errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.testing.arch import TINY, tiny_architecture
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint

runner = CliRunner()

RECIPE = """\
loraforge: 1
name: cli-demo
title: CLI Demo
date: "2026-11-01"
precision: {save: float16}
inputs:
  base: {source: models/base.safetensors}
  style: {source: models/style.safetensors}
  convs: {source: models/convs.safetensors}
targets:
  baked:
    kind: checkpoint
    base: base
    loras:
      - use: style
        strength: 0.7
        te: 0.2
        blocks: OUTD
      - {use: convs, strength: -0.4}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    sd1 = tiny_architecture("sd1")
    write_synthetic_checkpoint(folder / "base.safetensors", sd1, seed=1, dtype="F32")
    write_synthetic_adapter(folder / "style.safetensors", sd1, "lora", rank=4, seed=2)
    write_synthetic_adapter(folder / "convs.safetensors", sd1, "lora", rank=4, seed=3, targets="all")
    write_synthetic_adapter(folder / "xl.safetensors", tiny_architecture("sdxl"), "lora", rank=4, seed=4)
    return folder


@pytest.fixture
def project(tmp_path, models) -> Path:
    (tmp_path / "models").symlink_to(models, target_is_directory=True)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def tree_snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "models" not in p.parts)


def test_build_writes_output_with_metadata(project):
    result = invoke("build", project / "recipe.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    output = project / "dist/baked.safetensors"
    data = output.read_bytes()
    assert f"sha256 {hashlib.sha256(data).hexdigest()}" in result.output
    with open_safetensors(output) as baked:
        meta = baked.metadata
        header_size = baked.header_size
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "CLI Demo"
    assert meta["modelspec.date"] == "2026-11-01"
    assert meta["modelspec.merged_from"] == "base, style, convs"
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[header_size:]).hexdigest()
    recipe = json.loads(meta["loraforge.recipe"])
    assert recipe["targets"]["baked"]["loras"][0]["strength"] == 0.7
    inputs = json.loads(meta["loraforge.inputs"])
    assert inputs["style"] == hashlib.sha256((project / "models/style.safetensors").read_bytes()).hexdigest()
    assert list(meta) == sorted(meta)


def test_plan_json_reports_matching_and_status(project):
    result = invoke("plan", project / "recipe.yaml", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    (target,) = report["targets"]
    assert target["status"] == "missing"
    style, convs = target["loras"]
    assert style["matched"] == style["modules"] and not style["unmatched"]
    assert style["te"] == 0.2 and style["block_weights"]["OUT03"] == 1 and style["block_weights"]["IN04"] == 0
    assert "IN00" in convs["modules_per_block"]  # LoCon reaches conv_in's block
    assert sum(target["modules_per_block"].values()) == target["weights_baked"] or target["weights_baked"] > 0
    assert invoke("build", project / "recipe.yaml", "-q").exit_code == 0
    again = json.loads(invoke("plan", project / "recipe.yaml", "--json").output)
    assert again["targets"][0]["status"] == "up to date"


def _build_in_subprocess(project: Path, threads: str, hashseed: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONHASHSEED": hashseed}
    code = (
        "import torch, sys; torch.set_num_threads(int(sys.argv[1])); "
        "from loraforge.cli import app; app(sys.argv[2:])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, threads, "build", str(project / "recipe.yaml"), "-q"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def test_builds_are_byte_identical_across_processes_threads_and_hash_seeds(project, models):
    other = project / "other"  # a second copy of the project: the two builds run side by side
    other.mkdir()
    (other / "models").symlink_to(models, target_is_directory=True)
    (other / "recipe.yaml").write_text(RECIPE)
    builds = [_build_in_subprocess(project, "1", "1"), _build_in_subprocess(other, "2", "4242")]
    for build in builds:
        output, _ = build.communicate(timeout=600)
        assert build.returncode == 0, output.decode()
    first, second = (hashlib.sha256((folder / "dist/baked.safetensors").read_bytes()).hexdigest() for folder in (project, other))
    assert first == second


# --- errors: one clear paragraph, exit code 2, nothing written ---------------------------


def _edit(project: Path, old: str, new: str) -> None:
    recipe = project / "recipe.yaml"
    text = recipe.read_text()
    assert old in text
    recipe.write_text(text.replace(old, new))


ERROR_CASES = {
    "unknown field": ("    base: base\n", "    base: base\n    strenght: 1\n", ["recipe.yaml:14", "strenght"]),
    "missing input file": ("models/convs.safetensors", "models/nope.safetensors", ["convs", "does not exist"]),
    "wrong-length block vector": ("blocks: OUTD", 'blocks: "1,0,1"', ["recipe.yaml:18", "has 3", "26 or 17 values"]),
    "sdxl lora into sd1 base": ("models/convs.safetensors", "models/xl.safetensors", ["Stable Diffusion XL", "convs"]),
    "strength not a number": ("strength: 0.7", 'strength: "0.7"', ["recipe.yaml:16", "strength", "quotes"]),
    "output path is an input": (
        "      - {use: convs, strength: -0.4}\n",
        "      - {use: convs, strength: -0.4}\n    output: models/base.safetensors\n",
        ["output", "overwrite", "base"],
    ),
    "cycle": (
        "      - {use: convs, strength: -0.4}\n",
        "      - {use: convs, strength: -0.4}\n  again:\n    kind: checkpoint\n    base: again2\n"
        "  again2:\n    kind: checkpoint\n    base: again\n",
        ["cycle", "again -> again2 -> again"],
    ),
    "missing name": ("base: base\n", "base: bsae\n", ["bsae", "neither an input nor a target"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_gives_one_clear_error_and_writes_nothing(project, case):
    old, new, expected = ERROR_CASES[case]
    _edit(project, old, new)
    before = tree_snapshot(project)
    result = invoke("build", project / "recipe.yaml", "-q")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:")
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert tree_snapshot(project) == before


def test_unmatched_keys_are_an_error_unless_allowed(project, models):
    sd1 = tiny_architecture("sd1")
    write_synthetic_adapter(project / "odd.safetensors", sd1, "lora", rank=2, seed=9)
    from safetensors.torch import load_file, save_file

    tensors = load_file(project / "odd.safetensors")
    some_module = next(k for k in tensors if k.endswith(".lora_down.weight"))[: -len(".lora_down.weight")]
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        tensors["lora_unet_not_a_layer" + suffix] = tensors[some_module + suffix].clone()
    save_file(tensors, project / "odd.safetensors")
    _edit(project, "models/convs.safetensors", "odd.safetensors")
    result = invoke("build", project / "recipe.yaml", "-q")
    assert result.exit_code == 2
    assert "lora_unet_not_a_layer" in result.output and "allow_unmatched" in result.output
    assert not (project / "dist").exists()
    _edit(project, "      - {use: convs, strength: -0.4}\n", "      - {use: convs, strength: -0.4}\n    allow_unmatched: true\n")
    result = invoke("build", project / "recipe.yaml", "-q")
    assert result.exit_code == 0, result.output


def test_selecting_an_unknown_target_is_an_error(project):
    result = invoke("build", project / "recipe.yaml", "nope", "-q")
    assert result.exit_code == 2 and "no target named 'nope'" in result.output


def test_cuda_device_without_gpu_is_a_clear_error(project):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = invoke("build", project / "recipe.yaml", "--device", "cuda", "-q")
    assert result.exit_code == 2 and "no CUDA GPU" in result.output
    assert not (project / "dist/baked.safetensors").exists()


# --- inspect -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,options,expected_kind,expected_rank",
    [
        ("lora", {}, "LoRA", "4"),
        ("lora", {"targets": "all"}, "LoCon", "4"),
        ("loha", {}, "LoHa", "4"),
        ("lokr", {}, "LoKr", "4"),
        ("diff", {}, "diff", "none"),
        ("peft", {}, "PEFT LoRA", "4"),
        ("lora", {"dora": True}, "DoRA", "4"),
    ],
)
def test_inspect_identifies_adapters(tmp_path, kind, options, expected_kind, expected_rank):
    arch = tiny_architecture("sd1")
    path = tmp_path / "adapter.safetensors"
    write_synthetic_adapter(path, arch, kind, rank=4, seed=1, **options)
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "adapter"
    assert report["adapter_kind"].startswith(expected_kind)
    assert report["architecture"] == "sd1"
    assert list(report["ranks"]) == [expected_rank]
    assert report["modules_per_block"]["BASE"] > 0 and report["modules_per_block"]["OUT11"] > 0
    assert report["hashes"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["hashes"]["autov2"] == report["hashes"]["sha256"][:10]
    assert not report["unmatched_modules"] and not report["unclaimed_keys"]


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_inspect_identifies_checkpoints(tmp_path, name):
    path = tmp_path / "model.safetensors"
    write_synthetic_checkpoint(path, tiny_architecture(name), seed=1)
    report = json.loads(invoke("inspect", path, "--json").output)
    assert report["kind"] == "checkpoint" and report["architecture"] == name and report["size_class"] == "scaled"
    assert report["dimensions"] == dict(TINY[name])
    assert report["missing_keys"] == [] and report["extra_keys"] == []
    with open_safetensors(path) as file:
        data_start = file.header_size
    assert report["hashes"]["data_sha256"] == hashlib.sha256(path.read_bytes()[data_start:]).hexdigest()
    human = invoke("inspect", path)
    assert human.exit_code == 0 and "checkpoint" in human.output


def test_inspect_refuses_a_truncated_file_without_traceback(tmp_path, models):
    path = tmp_path / "cut.safetensors"
    path.write_bytes((models / "style.safetensors").read_bytes()[:-100])
    result = invoke("inspect", path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cut.safetensors" in result.output


def _raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


def _tensor(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BROKEN_FILES = {
    "truncated": (lambda p: _raw_safetensors(p, {"a": _tensor(shape=(4,), offsets=(0, 16))}, b"\0" * 10), "truncated"),
    "header longer than file": (lambda p: p.write_bytes((10**6).to_bytes(8, "little") + b"{}"), "header"),
    "100 MB header": (lambda p: p.write_bytes((100 * 2**20).to_bytes(8, "little") + b"{}"), "header"),
    "overlapping offsets": (
        lambda p: _raw_safetensors(p, {"a": _tensor(offsets=(0, 4)), "b": _tensor(offsets=(2, 6))}, b"\0" * 6), "overlap"),
    "unknown dtype": (lambda p: _raw_safetensors(p, {"a": _tensor(dtype="Q7")}, b"\0" * 4), "Q7"),
    "shape/length mismatch": (lambda p: _raw_safetensors(p, {"a": _tensor(shape=(2,), offsets=(0, 4))}, b"\0" * 4), "a"),
    "non-string metadata": (
        lambda p: _raw_safetensors(p, {"__metadata__": {"k": 1}, "a": _tensor()}, b"\0" * 4), "metadata"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_inspect_refuses_broken_files_with_one_paragraph(tmp_path, case):
    make, fragment = BROKEN_FILES[case]
    path = tmp_path / "broken.safetensors"
    make(path)
    result = invoke("inspect", path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("error:")
    message = " ".join(result.output.split())
    assert "broken.safetensors" in message and fragment.lower() in message.lower(), message
