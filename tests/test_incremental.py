"""Incremental builds: action keys, up-to-date targets, --force, --jobs, interrupted builds.

One recipe with both chains the issue names (extract -> bake, merge -> bake)
and an independent concat, on tiny SD1 models with the real key names.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from slow_build import start_slow_build
from loraforge.testing.arch import tiny_architecture
from loraforge.testing.adapters import write_synthetic_adapter
from loraforge.testing.checkpoints import write_synthetic_checkpoint
from loraforge.testing.tuned import write_tuned_checkpoint

RECIPE = """\
loraforge: 1
name: chains
date: "2026-11-01"
seed: 5
device: cpu
precision: {save: float16}
inputs:
  base:  {source: models/base.safetensors}
  tuned: {source: models/tuned.safetensors}
  style: {source: models/style.safetensors}
  locon: {source: models/locon.safetensors}
targets:
  extracted:
    kind: extract
    tuned: tuned
    base: base
    rank: {rank: 4}
  merged:
    kind: lora
    method: svd
    loras:
      - {use: style, strength: 0.8}
      - {use: locon, strength: -0.3}
    rank: 4
  bundle:
    kind: lora
    method: concat
    loras:
      - {use: style, strength: 0.5}
  with-extracted:
    kind: checkpoint
    base: base
    loras:
      - {use: extracted, strength: 0.7}
  with-merged:
    kind: checkpoint
    base: base
    loras:
      - {use: merged}
      - {use: style, strength: 0.25}
"""
TARGETS = ["extracted", "merged", "bundle", "with-extracted", "with-merged"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chain-models")
    arch = tiny_architecture("sd1")
    write_synthetic_checkpoint(folder / "base.safetensors", arch, seed=11)
    # A fine-tune that changed every linear weight by a small rank-2 update.
    write_tuned_checkpoint(folder / "tuned.safetensors", folder / "base.safetensors", _rank_two_change)
    write_synthetic_adapter(folder / "style.safetensors", arch, kind="lora", rank=4, seed=12)
    write_synthetic_adapter(folder / "locon.safetensors", arch, kind="lora", rank=2, seed=13, targets="all")
    return folder


def _rank_two_change(key: str, weight):
    import torch

    if weight.ndim != 2 or not key.endswith(".weight"):
        return None
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(weight.shape[0], 2, generator=generator, dtype=torch.float64)
    down = torch.randn(2, weight.shape[1], generator=generator, dtype=torch.float64)
    return 0.01 * up @ down


@pytest.fixture
def project(tmp_path, models) -> Path:
    (tmp_path / "models").symlink_to(models, target_is_directory=True)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def build(project: Path, *args: str):
    result = CliRunner().invoke(app, ["build", "-q", str(project / "recipe.yaml"), *args])
    assert result.exit_code == 0, result.output
    return result.output


def built_targets(output: str) -> list[str]:
    return [line.split()[1] for line in output.splitlines() if line.startswith("built ")]


def up_to_date(output: str) -> list[str]:
    return [line.removeprefix("up to date ") for line in output.splitlines() if line.startswith("up to date ")]


def snapshot(project: Path) -> dict[str, tuple]:
    """Every file of the project (outputs, reports, lock) with its inode, mtime and sha256."""
    files = {}
    for path in sorted(project.rglob("*")):
        if path.is_file() and "models" not in path.parts and path.name != "recipe.yaml":
            stat = path.stat()
            files[str(path.relative_to(project))] = (stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


def edit(project: Path, old: str, new: str) -> None:
    recipe = project / "recipe.yaml"
    text = recipe.read_text()
    assert text.count(old) == 1, old
    recipe.write_text(text.replace(old, new))


def test_chains_build_in_dependency_order_and_a_second_build_does_nothing(project):
    first = build(project)
    assert built_targets(first) == TARGETS  # recipe order, each after what it reads
    lock = json.loads((project / "recipe.lock").read_text())
    assert sorted(lock["targets"]) == sorted(TARGETS)
    for name, entry in lock["targets"].items():
        output = project / entry["output"]
        assert hashlib.sha256(output.read_bytes()).hexdigest() == entry["sha256"] and output.stat().st_size == entry["size"]
    # SVD steps record the device class their bytes depend on; exact steps do not.
    assert {n for n, e in lock["targets"].items() if "device_class" in e} == {"extracted", "merged"}

    before = snapshot(project)
    second = build(project)
    assert built_targets(second) == [] and up_to_date(second) == TARGETS
    assert "nothing to do" in second
    assert snapshot(project) == before  # not one file rewritten, not even the lock

    planned = CliRunner().invoke(app, ["plan", "--json", str(project / "recipe.yaml")])
    assert {t["name"]: t["status"] for t in json.loads(planned.output)["targets"]} == dict.fromkeys(TARGETS, "up to date")


def test_a_dependent_waits_for_its_producer_and_shows_it_in_the_plan(project):
    planned = CliRunner().invoke(app, ["plan", "--json", str(project / "recipe.yaml")])
    states = {t["name"]: (t["status"], t["action_key"]) for t in json.loads(planned.output)["targets"]}
    assert states["with-merged"] == ("waiting", None) and states["with-extracted"] == ("waiting", None)
    assert states["merged"][0] == "missing" and len(states["merged"][1]) == 64


@pytest.mark.parametrize(
    "old,new,rebuilt",
    [
        # a bake's own strength: that bake only
        ("      - {use: style, strength: 0.25}", "      - {use: style, strength: 0.3}", ["with-merged"]),
        # a merge ingredient: the merge, and the bake that reads the merged LoRA
        ("      - {use: locon, strength: -0.3}", "      - {use: locon, strength: -0.35}", ["merged", "with-merged"]),
        # the extraction's rank: the extraction and its bake
        ("    rank: {rank: 4}", "    rank: {rank: 3}", ["extracted", "with-extracted"]),
    ],
)
def test_changing_one_strength_rebuilds_exactly_the_affected_targets(project, old, new, rebuilt):
    build(project)
    before = snapshot(project)
    edit(project, old, new)
    output = build(project)
    assert built_targets(output) == rebuilt
    assert up_to_date(output) == [t for t in TARGETS if t not in rebuilt]
    after = snapshot(project)
    changed = {path for path in after if after[path] != before.get(path)}
    outputs = {f"dist/{name}.safetensors" for name in rebuilt}
    reports = {f"dist/{name}.{kind}.json" for name in rebuilt for kind in ("merge", "extract")}
    assert outputs <= changed <= outputs | reports | {"recipe.lock"}


def test_an_edit_that_changes_only_the_recorded_recipe_still_rebuilds(project, models, tmp_path_factory):
    """Outputs record the recipe slice they came from, so a pinned sha256 changes their bytes (and key)."""
    build(project)
    digest = hashlib.sha256((models / "style.safetensors").read_bytes()).hexdigest()
    edit(project, "style: {source: models/style.safetensors}", f"style: {{source: models/style.safetensors, sha256: {digest}}}")
    assert built_targets(build(project)) == ["merged", "bundle", "with-merged"]
    fresh = tmp_path_factory.mktemp("fresh")
    (fresh / "models").symlink_to(models, target_is_directory=True)
    (fresh / "recipe.yaml").write_text((project / "recipe.yaml").read_text())
    build(fresh)
    assert {p: v[2] for p, v in snapshot(fresh).items()} == {p: v[2] for p, v in snapshot(project).items()}


def test_an_edited_or_deleted_output_is_rebuilt(project):
    build(project)
    output = project / "dist" / "bundle.safetensors"
    original = output.read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    output.write_bytes(bytes(damaged))
    assert built_targets(build(project)) == ["bundle"]
    assert output.read_bytes() == original
    (project / "dist" / "with-extracted.safetensors").unlink()
    assert built_targets(build(project)) == ["with-extracted"]


def test_force_rebuilds_the_named_target_and_same_bytes_keep_dependents_up_to_date(project):
    build(project)
    before = snapshot(project)
    output = build(project, "merged", "--force")
    # the merge is rebuilt to the same bytes, so the bake that reads it is still up to date
    assert built_targets(output) == ["merged"] and up_to_date(output) == []
    assert snapshot(project)["dist/merged.safetensors"][2] == before["dist/merged.safetensors"][2]
    everything = build(project, "--force")
    assert built_targets(everything) == TARGETS
    assert {p: v[2] for p, v in snapshot(project).items()} == {p: v[2] for p, v in before.items()}


def test_concurrent_jobs_give_the_same_bytes_as_a_serial_build(project, tmp_path_factory, models):
    build(project, "--jobs", "1")
    serial = {p: v[2] for p, v in snapshot(project).items()}
    other = tmp_path_factory.mktemp("parallel")
    (other / "models").symlink_to(models, target_is_directory=True)
    (other / "recipe.yaml").write_text(RECIPE)
    output = build(other, "--jobs", "3", "--memory-budget", "64G")
    assert sorted(built_targets(output)) == sorted(TARGETS)
    assert {p: v[2] for p, v in snapshot(other).items()} == serial


def test_a_tiny_memory_budget_still_builds_one_target_at_a_time(project):
    output = build(project, "--jobs", "4", "--memory-budget", "1K")
    assert sorted(built_targets(output)) == sorted(TARGETS)


def test_a_bad_memory_budget_is_a_clear_error(project):
    result = CliRunner().invoke(app, ["build", "-q", str(project / "recipe.yaml"), "--memory-budget", "lots"])
    assert result.exit_code == 2 and "--memory-budget 'lots' is not a size" in result.output


def test_a_failing_target_stops_the_others_and_keeps_what_finished(project):
    build(project)
    edit(project, "      - {use: style, strength: 0.25}", "      - {use: style, strength: 0.3}")
    edit(project, "      - {use: style, strength: 0.5}", "      - {use: style, strength: 0.6}")
    lock_before = json.loads((project / "recipe.lock").read_text())
    (project / "dist" / "with-merged.safetensors").unlink()
    (project / "dist" / "with-merged.safetensors").mkdir()  # the writer cannot rename over a folder
    result = CliRunner().invoke(app, ["build", "-q", "--jobs", "2", str(project / "recipe.yaml")])
    assert result.exit_code != 0
    lock = json.loads((project / "recipe.lock").read_text())
    assert lock["targets"]["with-merged"] == lock_before["targets"]["with-merged"]
    assert not [p for p in project.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]


# --- interrupted builds -------------------------------------------------------------



def temp_files(project: Path) -> list[Path]:
    return [p for p in (project / "dist").rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_build_keeps_outputs_and_lock_and_the_next_build_finishes(project, tmp_path, signum, exit_code):
    build(project)
    edit(project, "      - {use: extracted, strength: 0.7}", "      - {use: extracted, strength: 0.9}")
    edit(project, "    rank: {rank: 4}", "    rank: {rank: 3}")  # extracted, then with-extracted, rebuild
    previous = (project / "dist" / "with-extracted.safetensors").read_bytes()
    env = {**os.environ, "LORAFORGE_CACHE": os.environ.get("LORAFORGE_CACHE", str(tmp_path / "cache"))}
    # signalled while the second target (with-extracted) is half-written, after `extracted` finished
    process = start_slow_build(project / "recipe.yaml", 'self.path.name == "with-extracted.safetensors" and count % 400 == 0', 0.002, env)
    try:
        line = process.stderr.readline()
        assert "MIDWAY" in line, line + process.stderr.read()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == exit_code, stderr
    assert "no partial output was left behind" in stderr and "Traceback" not in stderr
    assert (project / "dist" / "with-extracted.safetensors").read_bytes() == previous
    assert temp_files(project) == []
    # The lock is whole and records the extraction that finished before the signal.
    lock = json.loads((project / "recipe.lock").read_text())
    extracted = project / "dist" / "extracted.safetensors"
    assert lock["targets"]["extracted"]["sha256"] == hashlib.sha256(extracted.read_bytes()).hexdigest()
    finish = build(project)
    assert built_targets(finish) == ["with-extracted"]
    assert built_targets(build(project)) == []


def test_locked_rebuilds_a_missing_producer_and_checks_its_readers_then(project):
    build(project)
    lock = (project / "recipe.lock").read_bytes()
    (project / "dist" / "merged.safetensors").unlink()
    # with-merged waits for merged, is planned again from the rebuilt file, and its key still matches the lock
    assert built_targets(build(project, "--locked")) == ["merged"]
    assert (project / "recipe.lock").read_bytes() == lock
    edit(project, "      - {use: locon, strength: -0.3}", "      - {use: locon, strength: -0.35}")
    result = CliRunner().invoke(app, ["build", "-q", "--locked", str(project / "recipe.yaml")])
    assert result.exit_code == 2 and "--locked: target 'merged' would be built differently" in result.output
    assert (project / "recipe.lock").read_bytes() == lock
