"""Acceptance of `kind: extract`: exact recovery, near-optimal randomized SVD, reproducibility, errors.

The checks read the written LoRA with the `safetensors` package and do the
math here (up @ down * alpha / rank, torch.linalg.svdvals), so they share no
code with loraforge's executor beyond the architecture table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraforge.errors import BuildError, RecipeError
from loraforge.execute.build import run_build
from loraforge.testing.arch import tiny_architecture
from loraforge.ops.extract import extract_low_rank, policy_for
from loraforge.build import plan_build
from loraforge.recipe.loader import load_recipe
from loraforge.testing.checkpoints import write_synthetic_checkpoint
from loraforge.testing.tuned import planted_delta, write_tuned_checkpoint

F32_EPS = torch.finfo(torch.float32).eps


def recipe_text(target: str = "", **fields) -> str:
    options = "".join(f"    {key}: {value}\n" for key, value in fields.items())
    return (
        "loraforge: 1\nname: ex\ndate: \"2026-11-01\"\nseed: 3\n"
        "precision: {compute: float32, save: float32}\n"
        "inputs:\n  base: {source: base.safetensors}\n  tuned: {source: tuned.safetensors}\n"
        "targets:\n  ex-lora:\n    kind: extract\n    tuned: tuned\n    base: base\n"
        f"{options}{target}"
    )


def build(folder: Path, text: str):
    path = folder / "recipe.yaml"
    path.write_text(text)
    plan = plan_build(load_recipe(path))
    return run_build(plan, device="cpu").built[0]


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def lora_deltas(path: Path) -> dict[str, torch.Tensor]:
    """kohya module name -> up @ down * alpha / rank as an (out, in*k*k) float64 matrix."""
    tensors = read_all(path)
    deltas = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down = tensors[key].double()
            up = tensors[f"{name}.lora_up.weight"].double()
            rank = down.shape[0]
            scale = float(tensors[f"{name}.alpha"]) / rank
            deltas[name] = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1) * scale
    return deltas


def module_part(tensor: torch.Tensor, module) -> torch.Tensor:
    part = tensor if module.rows is None else tensor[module.rows[0]:module.rows[1]]
    return part.double().reshape(part.shape[0], -1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Tiny SD 2 (fused qkv text encoder, 3x3 convs) in float32; tuned = base + rank-3 differences everywhere."""
    folder = tmp_path_factory.mktemp("planted")
    arch = tiny_architecture("sd2")
    write_synthetic_checkpoint(folder / "base.safetensors", arch, seed=1, dtype="F32")
    keys = {m.key for m in arch.modules}
    write_tuned_checkpoint(
        folder / "tuned.safetensors",
        folder / "base.safetensors",
        lambda key, weight: planted_delta(weight.shape, rank=3, seed=9, key=key, scale=0.1) if key in keys else None,
    )
    return folder, arch


def test_planted_low_rank_difference_is_recovered_exactly(planted):
    folder, arch = planted
    result = build(folder, recipe_text(rank=4, conv_rank=4))
    assert (len(result.extracted), len(result.skipped)) == (len(arch.modules), 0)
    base, tuned = read_all(folder / "base.safetensors"), read_all(folder / "tuned.safetensors")
    deltas = lora_deltas(result.written.path)
    assert set(deltas) == {m.kohya for m in arch.modules}
    for module in arch.modules:
        baked = module_part(base[module.key], module) + deltas[module.kohya]
        target = module_part(tuned[module.key], module)
        # Within float32 rounding of the weights (the tuned file itself is rounded to float32).
        tolerance = 8 * F32_EPS * float(target.abs().max())
        assert float((baked - target).abs().max()) <= tolerance, module.kohya
    report = json.loads(result.report_path.read_text())
    assert report["summary"]["extracted"] == len(arch.modules)
    assert all(entry["rank"] == 4 and entry["energy_retained"] > 1 - 1e-9 for entry in report["modules"])
    assert report["text_encoders"] == {"te": "included"}


def test_energy_policy_finds_the_planted_rank_and_exact_svd_is_optimal():
    matrix = planted_delta((48, 16, 3, 3), rank=3, seed=1, key="k", scale=0.1).reshape(48, -1)
    energy = extract_low_rank(matrix, policy_for(None, 0.9999, None, 8), method="randomized", recipe_seed=0, module_name="m")
    assert energy.rank == 3 and energy.relative_error < 1e-6  # computed from energies: ~sqrt(eps) floor
    assert float((matrix - energy.up @ energy.down).norm()) <= 1e-12 * float(matrix.norm())
    noisy = planted_delta((64, 48), rank=10**6, seed=2, key="k", scale=0.05, decay=0.93, noise=2e-3)
    values = torch.linalg.svdvals(noisy)
    exact = extract_low_rank(noisy, policy_for(4, None, None, None), method="exact", recipe_seed=0, module_name="m")
    optimal = math.sqrt(float((values[4:] ** 2).sum())) / float(values.norm())
    assert exact.relative_error == pytest.approx(optimal, rel=1e-9)
    assert float((noisy - exact.up @ exact.down).norm()) / float(noisy.norm()) == pytest.approx(optimal, rel=1e-9)


@pytest.fixture(scope="module")
def full_rank(tmp_path_factory):
    """Tiny SD 1.5, tuned = base + a slowly decaying full-rank difference plus noise on every UNet module."""
    folder = tmp_path_factory.mktemp("full-rank")
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(folder / "base.safetensors", arch, seed=2, dtype="F32")
    keys = {m.key for m in arch.modules if m.component == "unet"}

    def delta(key, weight):
        if key not in keys:
            return None
        return planted_delta(weight.shape, rank=10**6, seed=4, key=key, scale=0.05, decay=0.93, noise=2e-3)

    write_tuned_checkpoint(folder / "tuned.safetensors", folder / "base.safetensors", delta)
    text = recipe_text(rank=4, conv_rank=4, text_encoder="false", output="first/ex.safetensors")
    return folder, arch, text, build(folder, text)


def test_randomized_error_is_within_2_percent_of_the_optimal_truncation(full_rank):
    folder, arch, _, result = full_rank
    rank = 4
    base, tuned = read_all(folder / "base.safetensors"), read_all(folder / "tuned.safetensors")
    deltas = lora_deltas(result.written.path)
    by_name = {m.kohya: m for m in arch.modules}
    report = {entry["module"]: entry for entry in json.loads(result.report_path.read_text())["modules"]}
    ratios = []
    for name, approx in deltas.items():
        module = by_name[name]
        exact = module_part(tuned[module.key], module) - module_part(base[module.key], module)
        values = torch.linalg.svdvals(exact)
        optimal = math.sqrt(float((values[rank:] ** 2).sum())) / float(values.norm())
        error = float((exact - approx).norm()) / float(exact.norm())
        # The report states the same error (up to the float32 rounding of the saved factors).
        assert report[name]["relative_error"] == pytest.approx(error, rel=1e-4, abs=1e-6)
        if min(exact.shape) <= rank:  # kept whole (conv_out is 4 x 144): exact up to float32 factors
            assert error < 1e-6, name
            continue
        assert optimal > 0.05, name  # really full rank: the test would be vacuous otherwise
        ratios.append((error / optimal, name))
    assert len(ratios) >= sum(1 for m in arch.modules if m.component == "unet") - 2
    worst, name = max(ratios)
    assert worst <= 1.02, (worst, name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_rebuild_in_another_process_with_other_threads_is_byte_identical(full_rank):
    folder, _, text, first = full_rank
    (folder / "again.yaml").write_text(text.replace("first/", "again/"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    code = "from loraforge.cli import app; app()"
    subprocess.run(
        [sys.executable, "-c", code, "build", "-q", str(folder / "again.yaml"), "--device", "cpu"],
        check=True, env=env, capture_output=True,
    )
    assert sha256(folder / "again" / "ex.safetensors") == sha256(first.written.path)
    assert (folder / "again" / "ex.extract.json").read_bytes() == first.report_path.read_bytes()


def build_in_subprocess(folder: Path, name: str, text: str, threads: int) -> tuple[subprocess.Popen, Path]:
    """Start building ``text`` (its outputs moved under ``name/``) in a fresh process with OMP/MKL on ``threads`` threads."""
    (folder / f"{name}.yaml").write_text(text.replace("first/", f"{name}/"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = "from loraforge.cli import app; app()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "build", "-q", str(folder / f"{name}.yaml"), "--device", "cpu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    return process, folder / name / "ex.safetensors"


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_builds_on_one_and_on_two_threads_are_byte_identical(full_rank, svd):
    """Each module's SVD runs on one LAPACK/BLAS thread whatever OMP_NUM_THREADS/MKL_NUM_THREADS say."""
    folder = full_rank[0]
    text = recipe_text(rank=4, conv_rank=4, text_encoder="false", svd=svd, output="first/ex.safetensors")
    builds = [build_in_subprocess(folder, f"{svd}-{threads}", text, threads=threads) for threads in (1, 2)]  # side by side
    for process, _ in builds:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output.decode()
    (_, one), (_, two) = builds
    assert sha256(one) == sha256(two)
    assert one.with_suffix(".extract.json").read_bytes() == two.with_suffix(".extract.json").read_bytes()


def test_unchanged_modules_are_skipped_and_listed(tmp_path):
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, seed=1, dtype="F32")
    changed = {m.key for m in arch.modules if m.block == "OUT05"}
    te_key = next(m.key for m in arch.modules if m.is_text_encoder)

    def delta(key, weight):
        if key in changed:
            return planted_delta(weight.shape, rank=2, seed=1, key=key, scale=0.1)
        if key == te_key:  # a text-encoder change below min_diff
            return torch.full(weight.shape, 5e-5)
        return None

    write_tuned_checkpoint(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", delta)
    result = build(tmp_path, recipe_text(rank=2, conv_rank=2))
    assert sorted(o.module.kohya for o in result.extracted) == sorted(m.kohya for m in arch.modules if m.key in changed)
    assert len(result.skipped) == len(arch.modules) - len(changed)
    assert result.text_encoders == {"te": "unchanged, not extracted"}
    report = json.loads(result.report_path.read_text())
    skipped = {entry["module"]: entry for entry in report["skipped"]}
    te_name = next(m.kohya for m in arch.modules if m.key == te_key)
    assert skipped[te_name]["reason"].endswith("<= min_diff")
    assert all(e["reason"] == "unchanged (dW = 0)" for n, e in skipped.items() if n != te_name)
    assert set(read_all(result.written.path)) == {
        f"{m.kohya}.{suffix}" for m in arch.modules if m.key in changed
        for suffix in ("lora_up.weight", "lora_down.weight", "alpha")
    }
    # text_encoder: true takes any non-zero text-encoder difference.
    forced = build(tmp_path, recipe_text(rank=2, conv_rank=2, text_encoder="true", output="dist/forced.safetensors"))
    assert te_name in {o.module.kohya for o in forced.extracted}
    assert forced.text_encoders == {"te": "included"}


def test_identical_checkpoints_are_an_error_and_write_nothing(tmp_path):
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, seed=1, dtype="F16")
    write_synthetic_checkpoint(tmp_path / "tuned.safetensors", arch, seed=1, dtype="F16")
    with pytest.raises(BuildError, match="nothing to extract"):
        build(tmp_path, recipe_text())
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_different_architectures_are_one_error_at_planning(tmp_path):
    write_synthetic_checkpoint(tmp_path / "base.safetensors", tiny_architecture("sd1"), seed=1)
    write_synthetic_checkpoint(tmp_path / "tuned.safetensors", tiny_architecture("sdxl"), seed=1)
    (tmp_path / "recipe.yaml").write_text(recipe_text())
    with pytest.raises(RecipeError) as caught:
        plan_build(load_recipe(tmp_path / "recipe.yaml"))
    message = str(caught.value)
    assert "recipe.yaml:12:" in message and "targets.ex-lora.tuned" in message
    assert "Stable Diffusion XL" in message and "Stable Diffusion 1.x" in message
    assert "same architecture" in message


def test_different_shapes_are_one_error_at_planning(tmp_path):
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, seed=1)
    write_synthetic_checkpoint(tmp_path / "plain.safetensors", arch, seed=2)
    # An inpainting variant: conv_in takes 9 channels instead of 4.
    from loraforge.formats.safetensors_writer import SafetensorsWriter, TensorPlan

    tensors = read_all(tmp_path / "plain.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 9, *tensors[key].shape[2:], dtype=tensors[key].dtype)
    with SafetensorsWriter(tmp_path / "tuned.safetensors", [TensorPlan.of(k, v) for k, v in tensors.items()]) as writer:
        for name, value in tensors.items():
            writer.write(name, value)
        writer.commit()
    (tmp_path / "recipe.yaml").write_text(recipe_text())
    with pytest.raises(RecipeError) as caught:
        plan_build(load_recipe(tmp_path / "recipe.yaml"))
    assert "1 tensor(s) differ in shape" in str(caught.value)
    assert f"{key} is [16, 9, 3, 3] in 'tuned' but [16, 4, 3, 3] in 'base'" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("rank", "0", "the rank must be at least 1"),
        ("rank", "{energy: 1.5}", "'energy' is a fraction in (0, 1]"),
        ("rank", "{energy: 0.9, ratio: 3}", "needs exactly one of rank, energy, ratio"),
        ("rank", "{ratio: 0.5}", "'ratio' is sigma_max / sigma_k and at least 1"),
        ("conv_rank", "-1", "a rank cannot be negative"),
        ("text_encoder", "maybe", "text_encoder must be auto, true or false"),
        ("svd", "fast", "unknown svd method 'fast'"),
        ("clamp_quantile", "1.5", "clamp_quantile is a quantile between 0.5 and 1"),
        ("min_diff", "-1", "min_diff cannot be negative"),
    ],
)
def test_bad_extract_fields_are_positioned_errors(tmp_path, field, value, expected):
    (tmp_path / "recipe.yaml").write_text(recipe_text(**{field: value}))
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "recipe.yaml")
    assert f"targets.ex-lora.{field}" in str(caught.value) and expected in str(caught.value)


def test_defaults_and_rank_forms(tmp_path):
    (tmp_path / "recipe.yaml").write_text(recipe_text(rank="{ratio: 20, max: 128}", conv_rank=0))
    target = load_recipe(tmp_path / "recipe.yaml").recipe.targets["ex-lora"]
    assert (target.rank.ratio, target.rank.max, target.rank.rank, target.conv_rank) == (20.0, 128, None, None)
    assert (target.text_encoder, target.svd, target.clamp_quantile, target.min_diff) == ("auto", "randomized", None, 1e-4)
    (tmp_path / "recipe.yaml").write_text(recipe_text())
    assert load_recipe(tmp_path / "recipe.yaml").recipe.targets["ex-lora"].rank.rank == 32


def test_example_recipe_plans_and_builds_from_the_committed_demo_inputs(tmp_path):
    """recipes/extract-demo.yaml: a bake target feeds the extraction (copied, so the repo stays clean)."""
    import shutil

    from typer.testing import CliRunner

    from loraforge.cli import app

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    shutil.copy(recipes / "extract-demo.yaml", tmp_path / "extract-demo.yaml")
    (tmp_path / "models").mkdir()
    for name in ("tiny-sd15-base", "neon-lora", "noir-locon"):
        shutil.copy(recipes / "models" / f"{name}.safetensors", tmp_path / "models")
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", "--json", str(tmp_path / "extract-demo.yaml")])
    assert planned.exit_code == 0, planned.output
    target = json.loads(planned.output)["targets"][1]
    assert (target["kind"], target["tuned"], target["base"], target["depends_on"]) == (
        "extract", "neon-noir-full", "base", ["neon-noir-full"]
    )
    assert (target["rank"], target["conv_rank"], target["candidate_modules"]) == ({"energy": 0.999, "max": 16}, {"rank": 8}, 354)
    built = runner.invoke(app, ["build", "-q", "--device", "cpu", str(tmp_path / "extract-demo.yaml")])
    assert built.exit_code == 0, built.output
    assert "354 modules extracted" in built.output and "te included" in built.output
    report = json.loads((tmp_path / "dist" / "neon-noir-lora.extract.json").read_text())
    # neon (rank 8) + noir (rank 4) change every module by at most rank 12; 99.9 % energy never needs more.
    assert max(entry["rank"] for entry in report["modules"]) <= 12
    assert report["summary"]["min_energy_retained"] >= 0.999
    # The lock records the numeric environment of the SVD step (only), next to its device class.
    from loraforge.plan.numeric_environment import numeric_environment

    locked = json.loads((tmp_path / "extract-demo.lock").read_text())["targets"]
    assert locked["neon-noir-lora"]["device_class"] == "cpu"
    assert locked["neon-noir-lora"]["numeric_environment"] == numeric_environment("cpu").to_json()
    assert "numeric_environment" not in locked["neon-noir-full"] and "numeric_environment" not in locked["neon-noir-rebaked"]


def test_an_extraction_is_not_a_base_but_feeds_a_bake_as_a_lora(tmp_path):
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(tmp_path / "base.safetensors", arch, seed=1)
    write_synthetic_checkpoint(tmp_path / "tuned.safetensors", arch, seed=2)
    (tmp_path / "recipe.yaml").write_text(recipe_text() + "  baked:\n    kind: checkpoint\n    base: ex-lora\n    loras: []\n")
    with pytest.raises(RecipeError) as caught:
        plan_build(load_recipe(tmp_path / "recipe.yaml"))
    assert "target 'ex-lora' produces a LoRA, not a checkpoint" in str(caught.value), str(caught.value)

    text = recipe_text(rank="{rank: 4}") + "  baked:\n    kind: checkpoint\n    base: base\n    loras: [{use: ex-lora, strength: 0.5}]\n"
    (tmp_path / "recipe.yaml").write_text(text)
    plan = plan_build(load_recipe(tmp_path / "recipe.yaml"))
    assert plan.state == {"ex-lora": "missing", "baked": "waiting"}
    built = run_build(plan, device="cpu").built
    assert [r.target for r in built] == ["ex-lora", "baked"]
    # The bake was planned again from the real extracted file: base + 0.5 * (up @ down), in float32.
    base, baked = read_all(tmp_path / "base.safetensors"), read_all(tmp_path / "dist" / "baked.safetensors")
    deltas = lora_deltas(tmp_path / "dist" / "ex-lora.safetensors")
    checked = 0
    for module in arch.modules:
        if module.kohya not in deltas or module.rows is not None or module.is_conv:
            continue
        expected = (base[module.key].double() + 0.5 * deltas[module.kohya].reshape(module.shape)).float()
        assert torch.equal(baked[module.key], expected), module.key
        checked += 1
    assert checked > 100
