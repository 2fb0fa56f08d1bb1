"""Correctly rounded outputs are the same bytes under any BLAS code path and thread count.

The example recipes' bake (LoRA + LoCon + LoHa) and concat merge are built in
fresh processes under MKL's default code path, ``MKL_CBWR=COMPATIBLE`` (the
SSE2 kernels), ``MKL_CBWR=AVX2`` where the CPU has it, and with one and two
threads, and must all equal the sha256 committed in the example locks, which
were written on another machine: certified rounding makes these bytes a
function of the input bytes alone.

One fresh process per environment builds every certified target (`loraforge
build` once per recipe, each target once); the environments' processes run
side by side, so their bytes must not depend on the machine being busy either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.formats.hashing import file_hashes

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MODELS = ("tiny-sd15-base", "neon-lora", "noir-locon", "grain-loha",
          "tiny-flux-dev", "flux-style-kohya", "flux-detail-diffusers",
          "tiny-sd15-anime", "tiny-sd15-photo")
# (recipe, target) pairs whose outputs are correctly rounded (no SVD step upstream).
# The TIES target is fixed-order float64 rounded once (not certified), so on CPUs its bytes too are
# independent of BLAS and threads; its weighted-sum target is correctly rounded.
CERTIFIED = (("demo", "neon-noir"), ("merge-chain", "neon-noir-bundle"), ("flux-demo", "flux-style"),
             ("merge-checkpoints", "anime-photo-blend"), ("merge-checkpoints", "anime-photo-ties"))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


ENVIRONMENTS = [
    pytest.param({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}, id="default-2-threads"),
    pytest.param({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, id="default-1-thread"),
    pytest.param({"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "2"}, id="cbwr-compatible"),
    pytest.param({"MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1"}, id="cbwr-avx2",
                 marks=pytest.mark.skipif("avx2" not in _cpu_flags(), reason="the CPU has no AVX2")),
]


def _locked_sha256(recipe: str, target: str) -> str:
    lock = json.loads((RECIPES / f"{recipe}.lock").read_text())
    return lock["targets"][target]["sha256"]


# Builds each recipe's certified targets with the CLI, in this one process, in order; exit codes on stdout.
DRIVER = """
import json, sys
from loraforge.cli import app
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        app(argv)
    except SystemExit as done:
        codes.append(done.code or 0)
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{environment id: (process, folder)}: every environment's build started at once, each in its own folder."""
    recipes: dict[str, list[str]] = {}
    for recipe, target in CERTIFIED:
        recipes.setdefault(recipe, []).append(target)
    started = {}
    for param in ENVIRONMENTS:
        if any(mark.name == "skipif" and mark.args[0] for mark in param.marks):
            continue
        overrides = param.values[0]
        folder = tmp_path_factory.mktemp(f"repro-{param.id}")
        (folder / "models").mkdir()
        for name in MODELS:
            shutil.copy(RECIPES / "models" / f"{name}.safetensors", folder / "models")
        for recipe in recipes:
            shutil.copy(RECIPES / f"{recipe}.yaml", folder / f"{recipe}.yaml")
        argvs = [["build", "-q", str(folder / f"{recipe}.yaml"), *targets] for recipe, targets in recipes.items()]
        env = {key: value for key, value in os.environ.items() if not key.startswith(("MKL_", "OMP_"))}
        env.update(overrides, PYTHONHASHSEED=overrides.get("OMP_NUM_THREADS", "0"))
        process = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(argvs)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[param.id] = (process, folder, len(argvs))
    yield started
    for process, _, _ in started.values():
        if process.poll() is None:  # a test stopped early: leave no build running
            process.kill()
            process.communicate()


@pytest.mark.parametrize("overrides", ENVIRONMENTS)
def test_certified_outputs_equal_the_committed_lock_under_every_code_path(builds, request, overrides):
    process, folder, count = builds[request.node.callspec.id]
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == [0] * count, stderr
    for recipe, target in CERTIFIED:
        lock = json.loads((folder / f"{recipe}.lock").read_text())
        output = folder / lock["targets"][target]["output"]
        assert file_hashes(output).sha256 == _locked_sha256(recipe, target), (recipe, target, overrides)
