"""Benchmark: bake 4 LoRAs into a full-size synthetic checkpoint vs a plain copy.

    python benchmarks/bench_bake.py --arch sd1 [--arch sdxl] [--repeats 2]

For each architecture it writes (once, cached under benchmarks/work/) a
full-size synthetic F16 checkpoint and four adapters of ranks 4-32 (one LoCon
with 3x3 convs, one with text-encoder modules), then times side by side, each
in a fresh process:

- ``raw copy``: the physical floor - the checkpoint's bytes to a new file in
  8 MiB chunks, fsync, rename (what any tool must at least do);
- ``copy``: a plain streaming safetensors read+write (the baseline the
  targets are stated against): safetensors reads each tensor, its bytes are
  written, fsync, rename;
- ``loraforge``: ``loraforge build`` of a recipe baking the four adapters.

It reports wall time, the ratio to the copy, and peak RSS (from wait4's
rusage of each child). Runs alternate so page-cache effects hit both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work"

# (name, kind, rank, extra options) - ranks 4..32, one LoCon with convs.
ADAPTERS = (
    ("style", "lora", 32, {"text_encoder": True}),
    ("detail", "lora", 16, {"text_encoder": False, "targets": "all"}),
    ("light", "lora", 8, {"text_encoder": True}),
    ("grain", "lora", 4, {"text_encoder": False}),
)

# The baseline the targets are stated against: a plain streaming safetensors
# read+write (the safetensors package reads each tensor, its bytes are written
# after the original header), fsync, rename. Imports torch like any such tool.
SAFETENSORS_COPY_SCRIPT = """
import json, os, struct, sys, torch
from safetensors import safe_open
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as raw:
    (length,) = struct.unpack("<Q", raw.read(8))
    header = raw.read(length)
entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
tmp = dst + ".tmp"
with safe_open(src, framework="pt") as fin, open(tmp, "wb") as fout:
    fout.write(struct.pack("<Q", length) + header)
    for name in sorted(entries, key=lambda k: entries[k]["data_offsets"][0]):
        tensor = fin.get_tensor(name)
        if tensor.numel():
            fout.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    fout.flush()
    os.fsync(fout.fileno())
os.replace(tmp, dst)
"""

# The physical floor: the file's bytes copied in 8 MiB chunks, no parsing.
COPY_SCRIPT = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
tmp = dst + ".tmp"
with open(src, "rb") as fin, open(tmp, "wb") as fout:
    while chunk := fin.read(8 << 20):
        fout.write(chunk)
    fout.flush()
    os.fsync(fout.fileno())
os.replace(tmp, dst)
"""


def prepare(arch_name: str) -> Path:
    """Write the inputs and the recipe (once); returns the recipe path."""
    from loraforge.formats.arch import get_architecture
    from loraforge.testing.adapters import write_synthetic_adapter
    from loraforge.testing.checkpoints import write_synthetic_checkpoint

    folder = WORK / arch_name
    folder.mkdir(parents=True, exist_ok=True)
    arch = get_architecture(arch_name, "full")
    base = folder / "base.safetensors"
    if not base.exists():
        started = time.perf_counter()
        write_synthetic_checkpoint(base, arch, seed=0, dtype="F16")
        print(f"  generated {base} in {time.perf_counter() - started:.1f} s", flush=True)
    for seed, (name, kind, rank, options) in enumerate(ADAPTERS, start=1):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            write_synthetic_adapter(path, arch, kind, rank=rank, seed=seed, **options)
    recipe = folder / "bench.yaml"
    loras = "\n".join(
        f"      - {{use: {name}, strength: {0.8 if i % 2 == 0 else -0.4}}}" for i, (name, *_rest) in enumerate(ADAPTERS)
    )
    inputs = "\n".join(f"  {name}: {{source: {name}.safetensors}}" for name, *_rest in ADAPTERS)
    recipe.write_text(
        textwrap.dedent(
            """\
            loraforge: 1
            name: bench
            date: "2026-11-01"
            precision: {save: same}
            inputs:
              base: {source: base.safetensors}
            """
        )
        + inputs
        + "\ntargets:\n  baked:\n    kind: checkpoint\n    base: base\n    loras:\n"
        + loras
        + "\n    output: out/baked.safetensors\n"
    )
    return recipe


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(command)}")
    return elapsed, usage.ru_maxrss * 1024


def run(arch_name: str, repeats: int) -> dict:
    print(f"[{arch_name}] preparing inputs", flush=True)
    recipe = prepare(arch_name)
    folder = recipe.parent
    (folder / "out").mkdir(exist_ok=True)
    base = str(folder / "base.safetensors")
    commands = {
        "raw copy": [sys.executable, "-c", COPY_SCRIPT, base, str(folder / "out/raw-copy.safetensors")],
        "copy": [sys.executable, "-c", SAFETENSORS_COPY_SCRIPT, base, str(folder / "out/copy.safetensors")],
        "loraforge": [sys.executable, "-m", "loraforge.cli", "build", str(recipe), "--quiet", "--device", "cpu"],
    }
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    timed(commands["raw copy"])  # warm the page cache for every contender alike
    for _ in range(repeats):
        for name, command in commands.items():
            samples[name].append(timed(command))
            print(f"  {name}: {samples[name][-1][0]:.2f} s, peak RSS {samples[name][-1][1] / 2**20:.0f} MiB", flush=True)
    adapters_bytes = sum((folder / f"{n}.safetensors").stat().st_size for n, *_ in ADAPTERS)
    result = {name: (statistics.median(s[0] for s in runs), max(s[1] for s in runs)) for name, runs in samples.items()}
    base_bytes = (folder / "base.safetensors").stat().st_size
    return {"arch": arch_name, "base_bytes": base_bytes, "adapter_bytes": adapters_bytes, **result}


def report(rows: list[dict]) -> None:
    print(
        "\n| arch | checkpoint | adapters | raw copy | safetensors copy | loraforge bake | bake / copy "
        "| copy RSS | bake RSS | RSS target (1 GiB + adapters) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        raw_t, _ = row["raw copy"]
        copy_t, copy_rss = row["copy"]
        bake_t, bake_rss = row["loraforge"]
        target = 2**30 + row["adapter_bytes"]
        print(
            f"| {row['arch']} | {row['base_bytes'] / 2**30:.2f} GiB | {row['adapter_bytes'] / 2**20:.0f} MiB "
            f"| {raw_t:.2f} s | {copy_t:.2f} s | {bake_t:.2f} s | {bake_t / copy_t:.2f}x "
            f"| {copy_rss / 2**20:.0f} MiB | {bake_rss / 2**20:.0f} MiB | {target / 2**20:.0f} MiB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=("sd1", "sd2", "sdxl"), help="default: sd1 and sdxl")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = [run(arch, args.repeats) for arch in (args.arch or ["sd1", "sdxl"])]
    report(rows)


if __name__ == "__main__":
    main()
