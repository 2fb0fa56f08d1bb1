"""Device check for a machine with a CUDA GPU: correctly rounded outputs must equal the CPU's bytes.

    python benchmarks/gpu_check.py [--full]

Builds the example bake (recipes/demo.yaml: LoRA + LoCon + LoHa) and concat
merge (recipes/merge-chain.yaml, neon-noir-bundle) with ``--device cuda`` in
a temporary copy and compares their sha256 with the committed locks (built
on a CPU). With ``--full`` it also builds the full-size SD 1.5 benchmark
recipe (benchmarks/work/sd1, made by bench_bake.py) on CUDA and on the CPU and
compares the two outputs, printing both wall times. Exit status 1 on any
difference. Meant to run as one short script on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
CHECKS = (("demo", "neon-noir"), ("merge-chain", "neon-noir-bundle"))


def build(recipe: Path, device: str, target: str | None = None) -> float:
    started = time.perf_counter()
    command = [sys.executable, "-m", "loraforge.cli", "build", "-q", "--force", "--device", device, str(recipe)]
    subprocess.run(command + ([target] if target else []), check=True)
    return time.perf_counter() - started


def output_sha256(recipe: Path, target: str) -> str:
    return json.loads(recipe.with_suffix(".lock").read_text())["targets"][target]["sha256"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the full-size SD 1.5 bake, CUDA vs CPU")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        shutil.copytree(RECIPES / "models", work / "models")
        for recipe, target in CHECKS:
            shutil.copy(RECIPES / f"{recipe}.yaml", work / f"{recipe}.yaml")
            seconds = build(work / f"{recipe}.yaml", "cuda", target)
            ours, locked = output_sha256(work / f"{recipe}.yaml", target), output_sha256(RECIPES / f"{recipe}.yaml", target)
            print(f"{recipe}/{target}: cuda {seconds:.1f} s, sha256 {ours[:12]} vs lock {locked[:12]}: "
                  f"{'same' if ours == locked else 'DIFFERENT'}")
            failed |= ours != locked
    if args.full:
        recipe = ROOT / "benchmarks" / "work" / "sd1" / "bench.yaml"
        hashes = {}
        for device in ("cuda", "cpu"):
            seconds = build(recipe, device)
            hashes[device] = output_sha256(recipe, "baked")
            print(f"sd1 bench bake on {device}: {seconds:.1f} s, sha256 {hashes[device][:12]}")
        failed |= hashes["cuda"] != hashes["cpu"]
    print("FAILED" if failed else "OK: CUDA bytes equal the CPU's")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
