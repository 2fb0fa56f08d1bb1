"""`build --executor ray` (issue 19, items 2-4): the same bytes and lock as a local build, built as Ray tasks.

One local Ray instance (2 CPUs, a small object store, no dashboard) serves
the whole module. Its workers get their own LORAFORGE_CACHE, as another
machine would have. The tests that need Ray skip when it is not installed;
the ones about its absence run either way.

What is checked here: the repository's matrix demo (a 2x3 matrix of bakes, a
rank matrix of SVD merges, a merge -> bake chain and a release) built with
Ray gives every output's sha256 and the lock of a local build and of the
committed lock; a second Ray build submits no task; an error in a worker is
the usual one-paragraph error naming the target and the lock keeps what
finished; a worker killed mid-write is retried once, and reported naming the
target when it dies again; Ctrl-C cancels the running task; a store (file://) carries every file when the
workers cannot open the driver's paths; a local build never imports ray.
Without Ray: a job pickles with its plan and the worker side (run in this
process) builds it, reports an unexpected exception as one paragraph naming
the target, and refuses a task from another loraforge version or, for an
SVD target, another numeric environment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'loraforge[ray]')")


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    ray = pytest.importorskip("ray")
    worker_cache = tmp_path_factory.mktemp("ray-worker-cache")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=150 << 20,
        log_to_driver=False,
        runtime_env={"env_vars": {"LORAFORGE_CACHE": str(worker_cache)}},
    )
    yield ray
    ray.shutdown()


def _demo(folder: Path, recipe: str = "matrix-demo.yaml") -> Path:
    folder.mkdir(parents=True)
    shutil.copy(RECIPES / recipe, folder / recipe)
    shutil.copytree(RECIPES / "models", folder / "models")
    return folder / recipe


def _outputs(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under dist/."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((folder / "dist").rglob("*"))
        if p.is_file()
    }


def _build(recipe: Path, *args: str, env: dict | None = None):
    return CliRunner().invoke(app, ["build", str(recipe), "--quiet", *args], env=env)


def _drive(recipe: Path, **executor_options):
    """A library build with a RayExecutor; returns (summary, executor)."""
    from loraforge.build import drive_build, plan_build
    from loraforge.execute.ray_executor import RayExecutor
    from loraforge.recipe.loader import load_recipe

    executor = RayExecutor(**executor_options)
    summary = drive_build(plan_build(load_recipe(recipe)), executor=executor)
    return summary, executor


@needs_ray
def test_matrix_demo_with_ray_gives_the_local_build_bytes_and_lock_and_a_second_build_submits_nothing(ray_instance, tmp_path):
    local, remote = _demo(tmp_path / "local"), _demo(tmp_path / "ray")
    assert _build(local).exit_code == 0
    summary, executor = _drive(remote)
    # 6 variants of the 2x3 bake matrix, both merges, the bake of a merged LoRA, the release
    names = [t.name for t in summary.targets.values()]
    assert len([n for n in names if n.startswith("neon-noir@")]) == 6
    assert executor.submitted == names  # every target, each as one Ray task
    for name in names:  # the memory estimate as Ray's memory resource; no GPU for CPU targets
        memory = summary.targets[name].memory_bytes
        assert executor.requests[name] == {"num_cpus": 1, "num_gpus": 0, **({"memory": memory} if memory else {})}
    assert all("memory" in executor.requests[name] for name in names if name != "release")
    assert [r.target for r in summary.built] == names

    ours = _outputs(remote.parent)
    assert ours == _outputs(local.parent)
    assert len(ours) >= 6 + 2 + 2 + 1  # bakes, merges and their reports, the chained bake, the release's files
    lock = remote.with_suffix(".lock").read_text()
    assert lock == local.with_suffix(".lock").read_text()
    assert lock == (RECIPES / "matrix-demo.lock").read_text()  # the committed lock, built locally

    again, executor = _drive(remote)
    assert executor.submitted == [] and again.built == []
    assert again.up_to_date == names
    assert remote.with_suffix(".lock").read_text() == lock


@needs_ray
def test_the_cli_builds_with_ray_and_says_what_ran(ray_instance, tmp_path):
    recipe = _demo(tmp_path / "cli")
    result = CliRunner().invoke(app, ["build", str(recipe), "--executor", "ray", "neon-noir@neon=0.6,noir=0"])
    assert result.exit_code == 0, result.output
    assert "started neon-noir@neon=0.6,noir=0 (checkpoint) as a Ray task" in result.output
    assert "finished neon-noir@neon=0.6,noir=0 on " in result.output
    entry = json.loads(recipe.with_suffix(".lock").read_text())["targets"]["neon-noir@neon=0.6,noir=0"]
    committed = json.loads((RECIPES / "matrix-demo.lock").read_text())["targets"]["neon-noir@neon=0.6,noir=0"]
    assert entry == committed


CHAIN = """\
loraforge: 1
name: ray-chain
date: "2026-11-01"
seed: 0
device: cpu
precision: {save: float16}
inputs:
  base:  {source: models/tiny-sd15-base.safetensors}
  neon:  {source: models/neon-lora.safetensors}
  noir:  {source: models/noir-locon.safetensors}
targets:
  merged:
    kind: lora
    method: svd
    loras: [{use: neon, strength: 0.8}, {use: noir, strength: -0.3}]
    rank: 4
  baked:
    kind: checkpoint
    base: base
    loras: [{use: merged, strength: STRENGTH}]
"""


def _chain(folder: Path, strength: str = "0.7") -> Path:
    folder.mkdir(parents=True)
    shutil.copytree(RECIPES / "models", folder / "models")
    recipe = folder / "chain.yaml"
    recipe.write_text(CHAIN.replace("STRENGTH", strength))
    return recipe


@needs_ray
def test_an_error_in_a_worker_is_one_paragraph_naming_the_target_and_the_lock_keeps_what_finished(ray_instance, tmp_path):
    recipe = _chain(tmp_path / "overflow", strength="1e30")  # the bake overflows float16: a BuildError on the worker
    result = CliRunner().invoke(app, ["build", str(recipe), "--executor", "ray"])
    assert result.exit_code == 2
    error = result.output[result.output.index("error:"):]
    assert "target 'baked'" in error and "infinite or NaN" in error
    assert "Traceback" not in result.output and "RayTaskError" not in result.output
    assert len(error.strip().split("\n\n")) == 1
    lock = json.loads(recipe.with_suffix(".lock").read_text())
    assert set(lock["targets"]) == {"merged"}  # the merge finished before the bake failed
    assert not (recipe.parent / "dist" / "baked.safetensors").exists()


@needs_ray
def test_a_cuda_target_on_a_cluster_without_gpus_is_refused_naming_it(ray_instance, tmp_path):
    recipe = _chain(tmp_path / "cuda")
    recipe.write_text(recipe.read_text().replace("device: cpu", "device: cuda"))
    result = CliRunner().invoke(app, ["build", str(recipe), "--executor", "ray", "--quiet"])
    assert result.exit_code == 2
    error = result.output[result.output.index("error:"):]
    assert "target 'merged' computes on CUDA (device: cuda), but no node of the Ray cluster has a GPU" in error
    assert not (recipe.parent / "dist").exists()


@needs_ray
def test_a_killed_worker_is_retried_once(ray_instance, tmp_path, monkeypatch):
    local, remote = _chain(tmp_path / "local"), _chain(tmp_path / "ray")
    assert _build(local).exit_code == 0
    attempts = tmp_path / "attempts"
    monkeypatch.setenv("LORAFORGE_TEST_RAY_KILL", f"baked:1:{attempts}")  # dies at its first progress report, once
    summary, executor = _drive(remote)
    assert len(list(attempts.iterdir())) == 2  # killed, then run again by Ray
    assert executor.submitted == ["merged", "baked"]  # submitted once: the retry is Ray's
    assert _outputs(remote.parent) == _outputs(local.parent)
    assert remote.with_suffix(".lock").read_text() == local.with_suffix(".lock").read_text()


@needs_ray
def test_a_worker_killed_twice_is_reported_naming_the_target(ray_instance, tmp_path, monkeypatch):
    recipe = _chain(tmp_path / "killed")
    monkeypatch.setenv("LORAFORGE_TEST_RAY_KILL", f"baked:2:{tmp_path / 'attempts'}")
    result = CliRunner().invoke(app, ["build", str(recipe), "--executor", "ray", "--quiet"])
    assert result.exit_code == 2
    error = result.output[result.output.index("error:"):]
    assert "target 'baked' was not built: its Ray worker died 2 times (Ray retried it 1 time" in error
    assert "Traceback" not in result.output
    assert len(list((tmp_path / "attempts").iterdir())) == 2
    assert set(json.loads(recipe.with_suffix(".lock").read_text())["targets"]) == {"merged"}
    assert not (recipe.parent / "dist" / "baked.safetensors").exists()
    # the next build (no kill) builds only what is missing, with the local build's bytes
    monkeypatch.delenv("LORAFORGE_TEST_RAY_KILL")
    summary, executor = _drive(recipe)
    assert executor.submitted == ["baked"]
    local = _chain(tmp_path / "local")
    assert _build(local).exit_code == 0
    assert _outputs(recipe.parent) == _outputs(local.parent)
    assert not [p for p in (recipe.parent / "dist").iterdir() if ".tmp-" in p.name]  # the dead worker's temp file is gone


@needs_ray
def test_with_a_store_workers_that_cannot_see_the_driver_files_fetch_and_upload_by_sha256(ray_instance, tmp_path, monkeypatch):
    local, remote = _chain(tmp_path / "local"), _chain(tmp_path / "ray")
    assert _build(local).exit_code == 0
    store = tmp_path / "store"
    lines = []
    # Workers cannot open anything below the driver's project folder (as on another machine).
    monkeypatch.setenv("LORAFORGE_TEST_RAY_HIDE", str(remote.parent))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.gettempdir()) / f"loraforge-ray-{dead.pid}-left"  # a scratch folder of a killed worker
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x")
    summary, executor = _drive(remote, store=store.as_uri(), log=lines.append)
    assert not stale.exists()
    assert executor.submitted == ["merged", "baked"]
    assert _outputs(remote.parent) == _outputs(local.parent)
    assert remote.with_suffix(".lock").read_text() == local.with_suffix(".lock").read_text()
    assert any(line.startswith("finished merged ") and "fetched neon, noir from the store" in line for line in lines)
    assert any(line.startswith("finished baked ") and "fetched base, merged from the store" in line for line in lines)
    # the store holds every file read and written, under its sha256
    blobs = {p.name for p in (store / "blobs" / "sha256").rglob("*") if p.is_file()}
    lock = json.loads(remote.with_suffix(".lock").read_text())
    assert {lock["targets"]["merged"]["sha256"], lock["targets"]["baked"]["sha256"]} <= blobs
    assert {entry["sha256"] for entry in lock["inputs"].values()} <= blobs
    for blob in (store / "blobs" / "sha256").rglob("*"):
        if blob.is_file():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


@needs_ray
def test_with_a_store_a_worker_that_sees_the_files_reads_them_in_place(ray_instance, tmp_path):
    recipe = _chain(tmp_path / "shared")
    lines = []
    _drive(recipe, store=(tmp_path / "store").as_uri(), log=lines.append)
    finished = [line for line in lines if line.startswith("finished ")]
    assert len(finished) == 2 and not any("fetched" in line for line in finished)


@needs_ray
def test_ctrl_c_cancels_the_running_task_and_keeps_what_finished(ray_instance, tmp_path, monkeypatch):
    import _thread
    import threading
    import time

    recipe = _chain(tmp_path / "interrupted")
    monkeypatch.setenv("LORAFORGE_TEST_RAY_STALL", "baked:120")  # the bake waits mid-write until cancelled

    def log(line: str) -> None:
        if line.startswith("started baked"):
            threading.Timer(1.0, _thread.interrupt_main).start()  # Ctrl-C once the bake runs

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _drive(recipe, log=log)
    assert time.monotonic() - started < 60  # cancelled, not waited for
    assert set(json.loads(recipe.with_suffix(".lock").read_text())["targets"]) == {"merged"}
    dist = recipe.parent / "dist"
    assert sorted(p.name for p in dist.iterdir()) == ["merged.merge.json", "merged.safetensors"]  # no temp file left


def _shipped(recipe: Path, name: str, **options):
    """Run one target the way a Ray worker does (execute/remote_job.py), in this process, without Ray."""
    from loraforge import __version__
    from loraforge.build import plan_build
    from loraforge.execute.job import BuildJob, dumps, loads
    from loraforge.execute.remote_job import WorkerOptions, run_shipped
    from loraforge.recipe.loader import load_recipe

    plan = plan_build(load_recipe(recipe))
    job = BuildJob(plan, plan.target(name), plan.lock)
    worker = WorkerOptions(**{"device": "cpu", "cpu_threads": 1, "version": __version__, **options})
    return loads(run_shipped("plan-id", dumps(plan), dumps(job.without_plan()), worker))


def test_a_job_pickles_with_its_plan_and_the_worker_side_builds_it(tmp_path):
    from loraforge.execute.remote_job import Shipped

    recipe = _chain(tmp_path / "job")
    outcome = _shipped(recipe, "merged")
    assert isinstance(outcome, Shipped) and outcome.uploads == ()
    assert outcome.result.written.path == recipe.parent / "dist" / "merged.safetensors"
    assert hashlib.sha256(outcome.result.written.path.read_bytes()).hexdigest() == outcome.result.written.sha256


def test_an_unexpected_error_on_a_worker_is_one_paragraph_naming_the_target(tmp_path, monkeypatch):
    from loraforge.execute.remote_job import Failed
    from loraforge.targets.lora import LoraKind

    def broken(self, target, run):
        raise ValueError("something loraforge did not expect")

    monkeypatch.setattr(LoraKind, "run", broken)
    outcome = _shipped(_chain(tmp_path / "bug"), "merged")
    assert isinstance(outcome, Failed) and outcome.error is None
    assert outcome.message.startswith("target 'merged' failed on the Ray worker ")
    assert "unexpected ValueError: something loraforge did not expect" in outcome.message
    assert "\n" not in outcome.message


def test_a_worker_with_another_version_or_numeric_environment_refuses_the_task(tmp_path):
    from loraforge.execute.remote_job import Failed
    from loraforge.plan.numeric_environment import numeric_environment

    recipe = _chain(tmp_path / "versions")
    outcome = _shipped(recipe, "merged", version="0.0.1")
    assert isinstance(outcome, Failed) and "the driver 0.0.1" in outcome.message and "target 'merged'" in outcome.message
    other = {**numeric_environment("cpu").to_json(), "torch": "0.0.1"}  # the driver's torch, as the worker sees it
    outcome = _shipped(recipe, "merged", environment=other)
    assert isinstance(outcome, Failed)
    assert "target 'merged' was not built on the Ray worker" in outcome.message and "torch" in outcome.message
    assert not (recipe.parent / "dist").exists()


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_local_build_never_imports_ray(tmp_path):
    recipe = _chain(tmp_path / "local")
    done = _run_python(
        f"""
        import sys
        from typer.testing import CliRunner
        from loraforge.cli import app
        result = CliRunner().invoke(app, ["build", {str(recipe)!r}, "--quiet"])
        assert result.exit_code == 0, result.output
        print("ray imported" if any(m == "ray" or m.startswith("ray.") for m in sys.modules) else "no ray")
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no ray"


def test_without_ray_the_ray_executor_is_one_paragraph_naming_the_extra(tmp_path):
    recipe = _chain(tmp_path / "noray")
    done = _run_python(
        f"""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed: `import ray` raises ImportError
        from typer.testing import CliRunner
        from loraforge.cli import app
        result = CliRunner().invoke(app, ["build", {str(recipe)!r}, "--executor", "ray"])
        print(result.exit_code)
        print(result.output)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    code, output = done.stdout.split("\n", 1)
    assert code == "2"
    assert "pip install 'loraforge[ray]'" in output and "Traceback" not in output
    assert len(output.strip().split("\n\n")) == 1
    assert not (recipe.parent / "dist").exists()  # refused before anything was planned or built


def test_a_damaged_store_blob_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    """Both ways out of the store (into an output path, into this machine's store) check the sha256:
    other bytes under a blob's name are one error naming the file, and no file or temp file remains."""
    import hashlib

    from loraforge.errors import BuildError
    from loraforge.execute.remote_store import RemoteStore

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    store = RemoteStore(f"file://{tmp_path / 'store'}")
    good = tmp_path / "good.bin"
    good.write_bytes(b"the right bytes")
    sha256 = hashlib.sha256(good.read_bytes()).hexdigest()
    assert store.upload(good, sha256)
    assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()] == [sha256]  # no temp file left
    (tmp_path / "out").mkdir()
    assert store.download(sha256, tmp_path / "out" / "copy.bin", "input 'x'") == len(b"the right bytes")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == b"the right bytes"
    assert store.fetch_into_local_store(sha256, "input 'x'").read_bytes() == b"the right bytes"

    damaged = hashlib.sha256(b"other").hexdigest()
    blob = Path(store.key(damaged))
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(b"not what the name says")
    with pytest.raises(BuildError, match="holds other bytes under sha256"):
        store.download(damaged, tmp_path / "out" / "bad.bin", "input 'y'")
    with pytest.raises(BuildError, match="input 'y': the store .* holds other bytes"):
        store.fetch_into_local_store(damaged, "input 'y'")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.bin"]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "tmp" in p.parent.name]
