"""Benchmark: a 2x4 matrix of full-size SD 1.5 bakes, local executor vs Ray on this machine (issue 19, item 5).

    python benchmarks/bench_matrix.py [--keep]

Inputs are bench_bake.py's full-size synthetic SD 1.5 checkpoint and
adapters (made once under benchmarks/work/sd1 by its ``prepare``). The
recipe bakes the style and detail LoRAs into the base with
``matrix: {loras.style.strength: [2 values], loras.detail.strength: [4 values]}``:
8 variants of about 2 GiB each. Timed side by side, each in a fresh process:

- ``copy``: a plain streaming safetensors read+write of the base (bench_bake's
  baseline), once; eight of them are the floor for the grid;
- ``local``: ``loraforge build matrix.yaml`` (the local executor, one target
  at a time, every core for each);
- ``local -j 2``: the same with ``--jobs 2`` (two targets at once, as Ray runs
  them on 2 cores), which separates Ray's own overhead from the concurrency;
- ``ray``: ``loraforge build matrix.yaml --executor ray`` (a Ray instance
  started by the build on this machine: one task per variant, 1 CPU each, so
  as many run at once as there are cores and memory).

It reports wall time, the ratios, and peak memory of the whole process tree
(the build and, for Ray, its raylet, GCS and workers), sampled from /proc every
0.2 s: the largest single process and the largest sum. Each run starts from
no outputs and no lock; the locks must be identical (every variant's
sha256). Unless ``--keep``, each output is deleted as soon as the lock
records it (the build never reads it again; 8 x 2 GiB do not always fit on
the shared box), and whatever is left after each run. On a machine of 2 cores the point is the overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_bake import SAFETENSORS_COPY_SCRIPT, prepare  # noqa: E402

STYLE = (0.4, 0.8)
DETAIL = (-0.4, -0.2, 0.2, 0.4)
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_recipe(folder: Path) -> Path:
    recipe = folder / "matrix.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        loraforge: 1
        name: bench-matrix
        date: "2026-11-01"
        device: cpu
        precision: {{save: same}}
        inputs:
          base: {{source: base.safetensors}}
          style: {{source: style.safetensors}}
          detail: {{source: detail.safetensors}}
        targets:
          grid:
            kind: checkpoint
            base: base
            loras:
              - {{use: style, strength: 0.8}}
              - {{use: detail, strength: -0.4}}
            output: matrix-out/grid.safetensors
            matrix:
              loras.style.strength: [{", ".join(map(str, STYLE))}]
              loras.detail.strength: [{", ".join(map(str, DETAIL))}]
        """))
    return recipe


def _tree_rss(root: int) -> tuple[int, int]:
    """(largest RSS of one process, sum of RSS) over ``root`` and its descendants, in bytes."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as handle:
                resident = int(handle.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = resident
    stack, seen = [root], []
    while stack:
        pid = stack.pop()
        seen.append(pid)
        stack.extend(children.get(pid, ()))
    values = [rss.get(pid, 0) for pid in seen]
    return max(values, default=0), sum(values)


def delete_recorded(folder: Path) -> None:
    """Delete each variant's output once the lock records it (the build never reads it again): the
    shared box has not always 8 x 2 GiB free. The lock is replaced by rename, so it is read whole."""
    try:
        lock = json.loads((folder / "matrix.lock").read_text())
    except (OSError, ValueError):
        return
    for entry in lock.get("targets", {}).values():
        (folder / entry["output"]).unlink(missing_ok=True)


def timed(command: list[str], cwd: Path, tick=None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS of the largest process and peak sum over the process tree; ``tick()`` runs
    with each sample."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    peaks = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            largest, total = _tree_rss(process.pid)
            peaks[0], peaks[1] = max(peaks[0], largest), max(peaks[1], total)
            if tick is not None:
                tick()
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"command failed ({process.returncode}): {' '.join(command)}\n{stderr.decode()[-2000:]}")
    return elapsed, peaks[0], peaks[1]


def clean(folder: Path) -> None:
    shutil.rmtree(folder / "matrix-out", ignore_errors=True)
    (folder / "matrix.lock").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the last run's outputs")
    args = parser.parse_args()

    folder = prepare("sd1").parent
    recipe = write_recipe(folder)
    loraforge = [sys.executable, "-m", "loraforge.cli", "build", recipe.name, "--quiet"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load before: {os.getloadavg()}", flush=True)

    rows, locks = [], {}
    copy_out = folder / "matrix-copy.safetensors"
    load = os.getloadavg()[0]
    seconds, largest, total = timed([sys.executable, "-c", SAFETENSORS_COPY_SCRIPT, "base.safetensors", copy_out.name], folder)
    copy_out.unlink(missing_ok=True)
    rows.append(("copy (1 checkpoint)", seconds, largest, total, load))
    print(f"  copy: {seconds:.1f} s", flush=True)
    for name, extra in (("local", []), ("local -j 2", ["--jobs", "2"]), ("ray", ["--executor", "ray"])):
        clean(folder)
        load = os.getloadavg()
        seconds, largest, total = timed(loraforge + extra, folder, None if args.keep else lambda: delete_recorded(folder))
        locks[name] = (folder / "matrix.lock").read_text()
        rows.append((f"{name} (8 bakes)", seconds, largest, total, load[0]))
        print(f"  {name}: {seconds:.1f} s, load before {load[0]:.2f}", flush=True)
        if not args.keep or name != "ray":
            clean(folder)
    same = locks["local"] == locks["ray"] == locks["local -j 2"]
    copy = rows[0][1]
    local = rows[1][1]
    print(f"\nlocks identical (every variant's sha256): {same}; load after: {os.getloadavg()}")
    print(f"variants: {sorted(json.loads(locks['ray'])['targets'])}")
    print("| run | wall | per bake | ÷ 8 copies | ÷ local | peak RSS, largest process | peak RSS, process tree | load before |")
    print("|---|---|---|---|---|---|---|---|")
    for label, seconds, largest, total, load in rows:
        bakes = 8 if "8 bakes" in label else 1
        print(f"| {label} | {seconds:.1f} s | {seconds / bakes:.1f} s | {seconds / (8 * copy):.2f}x | "
              f"{seconds / local:.2f}x | {largest / 2**20:.0f} MiB | {total / 2**20:.0f} MiB | {load:.2f} |")
    if not same:
        raise SystemExit("the local and Ray builds wrote different locks")


if __name__ == "__main__":
    main()
