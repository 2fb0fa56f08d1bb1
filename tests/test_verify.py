"""`loraforge verify` end to end on tiny models: reproduced, a flipped byte, a changed input,
the tolerance rule across device classes and numeric environments, and that verify writes
nothing the user owns."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.testing.arch import tiny_architecture
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import save_tensors
from loraforge.ops.compare import factored_relative_error
from loraforge.plan.numeric_environment import numeric_environment
from loraforge.resolve.hash_cache import cache_root
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint
from loraforge.cli_verify import report_lines
from loraforge.verify.run import verify_recipe
from loraforge.plan.tolerance import relative_error_tolerance

runner = CliRunner()

RECIPE = """\
loraforge: 1
name: verify-demo
title: Verify Demo
date: "2026-11-01"
precision: {save: float16}
inputs:
  base: {source: models/base.safetensors}
  style: {source: models/style.safetensors}
  convs: {source: models/convs.safetensors}
targets:
  merged:
    kind: lora
    method: svd
    loras:
      - {use: style, strength: 0.8}
      - {use: convs, strength: -0.5}
    rank: 4
  bundle:
    kind: lora
    method: concat
    loras:
      - {use: style, strength: 0.8}
  baked:
    kind: checkpoint
    base: base
    loras:
      - {use: merged}
"""
MERGED, BAKED = "dist/merged.safetensors", "dist/baked.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    sd1 = tiny_architecture("sd1")
    write_synthetic_checkpoint(folder / "base.safetensors", sd1, seed=1, dtype="F16")
    write_synthetic_adapter(folder / "style.safetensors", sd1, "lora", rank=4, seed=2)
    write_synthetic_adapter(folder / "convs.safetensors", sd1, "lora", rank=2, seed=3, targets="all", text_encoder=False)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, models) -> Path:
    """One build of the recipe; each test works on a copy of it."""
    folder = tmp_path_factory.mktemp("built")
    for name in ("base", "style", "convs"):
        (folder / "models").mkdir(exist_ok=True)
        (folder / "models" / f"{name}.safetensors").write_bytes((models / f"{name}.safetensors").read_bytes())
    (folder / "recipe.yaml").write_text(RECIPE)
    result = runner.invoke(app, ["build", str(folder / "recipe.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def project(tmp_path, built, monkeypatch) -> Path:
    folder = tmp_path / "project"
    for path in sorted(built.rglob("*")):
        if path.is_file():
            (folder / path.relative_to(built)).parent.mkdir(parents=True, exist_ok=True)
            (folder / path.relative_to(built)).write_bytes(path.read_bytes())
    scratch = tmp_path / "scratch"  # verify's temporary folder goes here, so the test can see it is removed
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))  # this test's hash-cache entries only
    return folder


def verify(project: Path, *args: str):
    return runner.invoke(app, ["verify", str(project / "recipe.yaml"), "--quiet", *args])


def verify_json(project: Path, *args: str) -> tuple[int, dict]:
    result = verify(project, "--json", *args)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


def snapshot(project: Path) -> dict[str, str]:
    """sha256 of the lock and of everything under dist/."""
    files = [project / "recipe.lock", *sorted((project / "dist").rglob("*"))]
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def assert_nothing_left() -> None:
    """No temporary folder, and no hash-cache entry for a file that was in one."""
    scratch = Path(tempfile.tempdir)
    assert list(scratch.iterdir()) == []
    entries = [json.loads(p.read_text()) for p in (cache_root() / "hashes").glob("*.json")]
    assert entries and not [e["path"] for e in entries if e["path"].startswith(str(scratch.resolve()))]


def targets_of(report: dict) -> dict[str, dict]:
    return {entry["target"]: entry for entry in report["targets"]}


def lock_of(project: Path) -> dict:
    return json.loads((project / "recipe.lock").read_text())


def write_lock(project: Path, lock: dict) -> None:
    (project / "recipe.lock").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")


def rewrite(path: Path, edit) -> str:
    """Rewrite a safetensors file with ``edit(tensors)`` applied; returns its new sha256."""
    with open_safetensors(path) as handle:
        tensors = {name: handle.read(name) for name in handle.names()}
        metadata = handle.metadata
    edit(tensors)
    save_tensors(path, tensors, metadata)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- reproduced -----------------------------------------------------------------


def test_untouched_build_verifies_and_nothing_is_written(project):
    before = snapshot(project)
    found = verify_recipe(project / "recipe.yaml")
    assert report_lines(found)[-1] == "OK: 3 targets verified against recipe.lock (3 reproduced)"
    assert snapshot(project) == before
    assert_nothing_left()  # the temporary rebuild is gone
    report = found.to_json()
    assert report["ok"] and report["input_drift"] == []
    rules = {name: (t["operation"], t["rule"], t["status"]) for name, t in targets_of(report).items()}
    assert rules == {
        "merged": ("merge (svd)", "byte-identical", "reproduced"),
        "bundle": ("merge (concat)", "byte-identical", "reproduced"),
        "baked": ("bake", "byte-identical", "reproduced"),
    }
    lock = lock_of(project)["targets"]
    assert lock["merged"]["device_class"] == "cpu"
    assert lock["merged"]["numeric_environment"] == numeric_environment("cpu").to_json()
    assert "numeric_environment" not in lock["bundle"] and "numeric_environment" not in lock["baked"]
    assert lock["merged"]["tolerance"] == {"relative_error": relative_error_tolerance(["F16"])}
    assert "tolerance" not in lock["bundle"] and "tolerance" not in lock["baked"]


# --- findings -------------------------------------------------------------------


def test_one_flipped_byte_names_the_target_tensor_and_module(project):
    output = project / BAKED
    key = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight"
    with open_safetensors(output) as handle:
        start, original = handle.info(key).start, handle.read(key).double()
    data = bytearray(output.read_bytes())
    data[start + 5] ^= 0x01  # the low bit of one float16's high byte
    output.write_bytes(bytes(data))
    with open_safetensors(output) as handle:
        flipped = handle.read(key).double()
    error = float(torch.linalg.norm(original - flipped) / torch.linalg.norm(flipped))  # rebuilt vs the disk's
    before = snapshot(project)
    result = verify(project)
    assert result.exit_code == 1, result.output
    assert "DIFFERS           baked" in result.output
    module = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    assert "dist/baked.safetensors on disk" in result.output and "differs from the lock's" in result.output
    assert [line for line in result.output.splitlines() if " module " in line] == [
        f"    module {module}: relative error {error:.3g} ({key})"
    ]
    assert "reproduced        merged" not in result.output  # -q: only what does not reproduce
    assert snapshot(project) == before
    assert_nothing_left()


def test_a_changed_input_names_the_input_the_targets_and_the_modules(project):
    sd1 = tiny_architecture("sd1")
    write_synthetic_adapter(project / "models/style.safetensors", sd1, "lora", rank=4, seed=99)
    before = snapshot(project)
    found = verify_recipe(project / "recipe.yaml")
    assert not found.ok
    assert any(line.startswith("INPUT CHANGED style:") and line.endswith("read by merged, bundle, baked")
               for line in report_lines(found))
    report = found.to_json()
    assert [d["input"] for d in report["input_drift"]] == ["style"]
    assert report["input_drift"][0]["targets"] == ["merged", "bundle", "baked"]
    verdicts = targets_of(report)
    for name in ("merged", "bundle", "baked"):
        assert verdicts[name]["status"] == "differs"
        assert verdicts[name]["sha256"]["on_disk"] == verdicts[name]["sha256"]["lock"] != verdicts[name]["sha256"]["rebuilt"]
    modules = [m["module"] for m in verdicts["bundle"]["difference"]["modules"]]
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v" in modules
    assert all(m["relative_error"] > 0.1 for m in verdicts["bundle"]["difference"]["modules"])
    assert snapshot(project) == before


def test_missing_lock_is_a_user_error(project):
    (project / "recipe.lock").unlink()
    result = verify(project)
    assert result.exit_code == 2
    assert "no lock file" in result.output


# --- another device class or numeric environment ----------------------------------

CUDA_ENVIRONMENT = {
    "device_class": "cuda", "blas": "cusolver", "processor": "NVIDIA H100 80GB HBM3", "isa": "sm_90",
    "blas_settings": "", "torch_kernels": "cuda", "torch": "2.13.0+cuda12.8",
}


def _fake_other_device(project: Path, edit, environment: dict | None = None, device_class: str = "cuda") -> dict:
    """Pretend `merged` was built elsewhere: its locked output is the CPU one edited by ``edit``, its lock
    entry names ``device_class`` and ``environment`` (a CUDA one by default; None drops the field, as an
    older loraforge wrote it)."""
    sha = rewrite(project / MERGED, edit)
    lock = lock_of(project)
    entry = lock["targets"]["merged"]
    entry.update(device_class=device_class, sha256=sha, size=(project / MERGED).stat().st_size)
    entry.pop("numeric_environment")
    if environment is not None or device_class == "cuda":
        entry["numeric_environment"] = environment or CUDA_ENVIRONMENT
    write_lock(project, lock)
    return entry


def _other_cpu() -> dict:
    """This machine's CPU environment with another vendor and SIMD level (an Intel AVX-512 box, or an AMD one)."""
    here = numeric_environment("cpu").to_json()
    other = ("amd", "avx2") if here["processor"] == "intel" else ("intel", "avx512f")
    return {**here, "processor": other[0], "isa": other[1]}


def _nudge(module: str, factor: float):
    """Scale one element of a module's up factor by ``factor`` (a re-rounding moves it one ulp)."""

    def edit(tensors):
        up = tensors[f"{module}.lora_up.weight"]
        flat = up.reshape(-1)
        flat[0] = (flat[0].double() * factor).to(up.dtype)

    return edit


def test_other_device_class_within_tolerance_passes(project):
    module = "lora_unet_mid_block_attentions_0_proj_in"
    entry = _fake_other_device(project, _nudge(module, 1 + 2.0**-10))  # one float16 ulp
    code, report = verify_json(project)
    merged = targets_of(report)["merged"]
    assert code == 0, json.dumps(merged, indent=1)
    assert (merged["rule"], merged["status"], merged["locked_device_class"]) == ("tolerance", "within tolerance", "cuda")
    assert merged["numeric_environment"] == {"lock": CUDA_ENVIRONMENT, "rebuilt": numeric_environment("cpu").to_json()}
    assert merged["tolerance"] == entry["tolerance"]["relative_error"]
    [measured] = merged["difference"]["modules"]
    assert measured["module"] == module and measured["within_tolerance"]
    assert 0 < measured["relative_error"] <= merged["tolerance"]
    assert targets_of(report)["baked"]["status"] == "reproduced"  # it read the CPU rebuild, which matches the disk's bake


def test_other_cpu_environment_is_compared_within_tolerance_and_named(project):
    """Same device class, another CPU (vendor, SIMD level): the lock's tolerance, and the report says why."""
    module = "lora_unet_mid_block_attentions_0_proj_in"
    other = _other_cpu()
    _fake_other_device(project, _nudge(module, 1 + 2.0**-10), other, device_class="cpu")
    found = verify_recipe(project / "recipe.yaml", ["merged"])
    [verdict] = found.targets
    assert found.ok and (verdict.rule, verdict.status) == ("tolerance", "within tolerance")
    here = numeric_environment("cpu")
    built = f"cpu/{other['blas']}/{other['processor']}/{other['isa']}"
    assert verdict.reasons[0] == (
        f"SVD step built on {built}, rebuilt on {here.label()} (processor {other['processor']} vs {here.processor}; "
        f"isa {other['isa']} vs {here.isa}): compared within the lock's tolerance {verdict.tolerance:.3g} per module"
    )
    assert verdict.reasons[0] in "\n".join(report_lines(found))


def test_a_lock_without_a_numeric_environment_is_compared_within_tolerance(project):
    """Locks written before the environment was recorded still load; their SVD steps get the tolerance rule."""
    module = "lora_unet_mid_block_attentions_0_proj_in"
    _fake_other_device(project, _nudge(module, 1 + 2.0**-10), None, device_class="cpu")
    assert "numeric_environment" not in lock_of(project)["targets"]["merged"]
    code, report = verify_json(project, "merged")
    merged = targets_of(report)["merged"]
    assert code == 0 and (merged["rule"], merged["status"]) == ("tolerance", "within tolerance")
    assert merged["numeric_environment"]["lock"] is None
    assert "a numeric environment the lock does not record (device class cpu)" in merged["reasons"][0]


def test_other_device_class_out_of_tolerance_names_the_module(project):
    module = "lora_unet_mid_block_attentions_0_proj_in"
    entry = _fake_other_device(project, _nudge(module, 1.5))
    with open_safetensors(project / MERGED) as handle:
        up, down = handle.read(f"{module}.lora_up.weight"), handle.read(f"{module}.lora_down.weight")
    found = verify_recipe(project / "recipe.yaml", ["merged"])
    text = "\n".join(report_lines(found))
    assert "DIFFERS           merged" in text and f"module {module}" in text and "FAILED" in text
    merged = targets_of(found.to_json())["merged"]
    assert merged["status"] == "differs"
    [measured] = merged["difference"]["modules"]
    assert measured["module"] == module and not measured["within_tolerance"]
    rebuilt_up = up.clone()
    rebuilt_up.reshape(-1)[0] = (up.reshape(-1)[0].double() / 1.5).to(up.dtype)  # undo the nudge: the CPU value
    golden = factored_relative_error(rebuilt_up, down, 1.0, up, down, 1.0)
    assert measured["relative_error"] == pytest.approx(golden, rel=1e-6)
    assert measured["relative_error"] > entry["tolerance"]["relative_error"]


def test_same_numeric_environment_demands_identical_bytes(project):
    """The same one-ulp nudge that passes across environments fails in the environment the lock names."""
    module = "lora_unet_mid_block_attentions_0_proj_in"
    _fake_other_device(project, _nudge(module, 1 + 2.0**-10), numeric_environment("cpu").to_json(), device_class="cpu")
    code, report = verify_json(project, "merged")
    merged = targets_of(report)["merged"]
    assert code == 1 and (merged["rule"], merged["status"]) == ("byte-identical", "differs")
    assert [m["module"] for m in merged["difference"]["modules"]] == [module]
    assert any(r.startswith("SVD step rebuilt in the numeric environment the lock records") for r in merged["reasons"])


def test_an_edited_recipe_is_named_as_the_cause(project):
    recipe = project / "recipe.yaml"
    text = recipe.read_text()
    bundle = text.index("  bundle:")
    recipe.write_text(text[:bundle] + text[bundle:].replace("strength: 0.8", "strength: 0.6", 1))
    found = verify_recipe(recipe, ["bundle"])
    [bundle_verdict] = found.targets
    assert not found.ok and bundle_verdict.status == "differs"
    assert any("action key differs from the lock's" in reason for reason in bundle_verdict.reasons)
    # every module of the bundle is the style LoRA scaled: 0.6 instead of 0.8 is a relative error of 1/4
    errors = [m.relative_error for m in bundle_verdict.difference.modules]
    assert errors and all(e == pytest.approx(0.25, abs=2e-3) for e in errors)
