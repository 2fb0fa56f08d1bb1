"""Benchmark: bake 4 LoRAs into a full-size synthetic checkpoint vs a plain copy.

    python benchmarks/bench_bake.py --arch sd1 [--arch sdxl] [--repeats 2]
        [--mecha-python /tmp/mecha-venv/bin/python]

For each architecture it writes (once, cached under benchmarks/work/) a
full-size synthetic F16 checkpoint and four adapters of ranks 4-32 (one LoCon
with 3x3 convs, one with text-encoder modules), then times side by side, each
in a fresh process:

- ``raw copy``: the physical floor - the checkpoint's bytes to a new file in
  8 MiB chunks, fsync, rename (what any tool must at least do);
- ``copy``: a plain streaming safetensors read+write (the baseline the
  targets are stated against): safetensors reads each tensor, its bytes are
  written, fsync, rename;
- ``loraforge``: ``loraforge build`` of a recipe baking the four adapters;
- ``sd-mecha`` (only with ``--mecha-python``): the same bake - same base,
  adapters, strengths, device (cpu), save dtype (F16) and thread count - by
  sd-mecha through its public API (benchmarks/mecha_bake.py). sd-mecha is no
  dependency of loraforge: install it into a separate environment, e.g.
  ``python3 -m venv --system-site-packages /tmp/mecha-venv &&
  /tmp/mecha-venv/bin/pip install "sd-mecha>=1.1,<1.2"``, and pass that
  environment's python. Without it (or where it cannot import sd_mecha, or
  for sd2, which sd-mecha 1.1 has no config for) the contender is skipped
  with a note.

It reports wall time, the ratio to the copy, and peak RSS (from wait4's
rusage of each child). Runs alternate so page-cache effects hit all alike.
With sd-mecha it then checks that both bakes did the same job: same keys,
same baked tensors, and the largest absolute difference between the two
outputs (sd-mecha merges in float32 by default, loraforge accumulates in
float64; both round once to F16).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work"
MECHA_DRIVER = ROOT / "mecha_bake.py"
# The synthetic base's float dtype; the recipe saves "same", so sd-mecha is told this one.
BASE_DTYPE = "F16"
MECHA_OUTPUT_DTYPE = "float16"
# sd-mecha's model config for each architecture (1.1.x has none for SD 2.x).
MECHA_CONFIGS = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}

# (name, kind, rank, extra options) - ranks 4..32, one LoCon with convs.
ADAPTERS = (
    ("style", "lora", 32, {"text_encoder": True}),
    ("detail", "lora", 16, {"text_encoder": False, "targets": "all"}),
    ("light", "lora", 8, {"text_encoder": True}),
    ("grain", "lora", 4, {"text_encoder": False}),
)


def strength(index: int) -> float:
    """The strength of the index-th adapter, for both contenders."""
    return 0.8 if index % 2 == 0 else -0.4


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
    arch = get_architecture(arch_name)
    base = folder / "base.safetensors"
    if not base.exists():
        started = time.perf_counter()
        write_synthetic_checkpoint(base, arch, seed=0, dtype=BASE_DTYPE)
        print(f"  generated {base} in {time.perf_counter() - started:.1f} s", flush=True)
    for seed, (name, kind, rank, options) in enumerate(ADAPTERS, start=1):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            write_synthetic_adapter(path, arch, kind, rank=rank, seed=seed, **options)
    recipe = folder / "bench.yaml"
    loras = "\n".join(
        f"      - {{use: {name}, strength: {strength(i)}}}" for i, (name, *_rest) in enumerate(ADAPTERS)
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


def mecha_version(python: str | None) -> tuple[str | None, str]:
    """sd-mecha's version under ``python``, or None and why the contender is skipped."""
    if not python:
        return None, "sd-mecha contender skipped: pass --mecha-python PATH (a python with sd-mecha 1.1.x installed)"
    probe = "import importlib.metadata, sd_mecha; print(importlib.metadata.version('sd-mecha'))"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"sd-mecha contender skipped: cannot run {python}: {error}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"sd-mecha contender skipped: {python} cannot import sd_mecha ({last})"
    return done.stdout.strip(), f"sd-mecha {done.stdout.strip()} under {python}"


def mecha_command(python: str, arch_name: str, folder: Path) -> list[str]:
    """The sd-mecha bake of the recipe's job: same base, adapters, strengths, save dtype, threads."""
    loras = [f"--lora={folder / f'{name}.safetensors'}={strength(i)}" for i, (name, *_rest) in enumerate(ADAPTERS)]
    return [
        python, str(MECHA_DRIVER), "--config", MECHA_CONFIGS[arch_name], "--base", str(folder / "base.safetensors"),
        *loras, "--output", str(folder / "out/mecha.safetensors"), "--output-dtype", MECHA_OUTPUT_DTYPE,
        # loraforge leaves torch at its default thread count (the cores); sd-mecha gets as many workers.
        "--threads", str(os.cpu_count() or 1),
    ]


def compare_outputs(base: Path, ours: Path, theirs: Path) -> dict:
    """How far two bakes of one job are apart, tensor by tensor (streamed; nothing big kept)."""
    import torch
    from safetensors import safe_open

    found = {"only_ours": [], "only_theirs": [], "dtype_differs": [], "baked_by_one_only": []}
    found.update(baked=0, elements=0, elements_differing=0, max_abs=0.0, max_abs_key=None, max_spacings=0.0)
    with safe_open(base, "pt") as fb, safe_open(ours, "pt") as fo, safe_open(theirs, "pt") as ft:
        keys_o, keys_t = set(fo.keys()), set(ft.keys())
        found["only_ours"], found["only_theirs"] = sorted(keys_o - keys_t), sorted(keys_t - keys_o)
        for key in sorted(keys_o & keys_t):
            original, mine, other = fb.get_tensor(key), fo.get_tensor(key), ft.get_tensor(key)
            if mine.dtype != other.dtype:
                found["dtype_differs"].append(f"{key} ({mine.dtype} vs {other.dtype})")
                continue
            baked_o, baked_t = not torch.equal(mine, original), not torch.equal(other, original)
            if baked_o != baked_t:
                found["baked_by_one_only"].append(key)
            if not (baked_o or baked_t) or not mine.is_floating_point():
                continue
            found["baked"] += 1
            diff = (mine.double() - other.double()).abs()
            found["elements"] += diff.numel()
            found["elements_differing"] += int((diff > 0).sum())
            if diff.max().item() > found["max_abs"]:
                found["max_abs"], found["max_abs_key"] = diff.max().item(), key
            # In units of the save dtype's spacing at our value (1.0 = one rounding step apart).
            eps, tiny = torch.finfo(mine.dtype).eps, torch.finfo(mine.dtype).tiny
            spacing = mine.double().abs().clamp_min(tiny) * eps
            found["max_spacings"] = max(found["max_spacings"], (diff / spacing).max().item())
    return found


def print_comparison(found: dict) -> None:
    print(
        f"  same job check (loraforge vs sd-mecha): keys only in ours {len(found['only_ours'])}, "
        f"only in sd-mecha's {len(found['only_theirs'])}; baked tensors {found['baked']}, "
        f"baked by one tool only {len(found['baked_by_one_only'])} {found['baked_by_one_only'][:3]}",
        flush=True,
    )
    share = found["elements_differing"] / max(found["elements"], 1)
    print(
        f"  baked weights: max abs difference {found['max_abs']:.3g} (at {found['max_abs_key']}), "
        f"{found['elements_differing']} of {found['elements']} elements differ ({share:.4%}), "
        f"at most {math.ceil(found['max_spacings'] - 1e-9)} rounding step(s) of the save dtype",
        flush=True,
    )
    if found["dtype_differs"]:
        print(f"  tensors saved in another dtype by sd-mecha: {found['dtype_differs']}", flush=True)


def run(arch_name: str, repeats: int, mecha_python: str | None) -> dict:
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
    if mecha_python and arch_name in MECHA_CONFIGS:
        commands["sd-mecha"] = mecha_command(mecha_python, arch_name, folder)
    elif mecha_python:
        print(f"  sd-mecha contender skipped: sd-mecha 1.1 has no model config for {arch_name}", flush=True)
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    timed(commands["raw copy"])  # warm the page cache for every contender alike
    for _ in range(repeats):
        for name, command in commands.items():
            # A lock from the previous run must never turn a timed build into an up-to-date no-op.
            recipe.with_suffix(".lock").unlink(missing_ok=True)
            samples[name].append(timed(command))
            print(f"  {name}: {samples[name][-1][0]:.2f} s, peak RSS {samples[name][-1][1] / 2**20:.0f} MiB", flush=True)
    adapters_bytes = sum((folder / f"{n}.safetensors").stat().st_size for n, *_ in ADAPTERS)
    result = {name: (statistics.median(s[0] for s in runs), max(s[1] for s in runs)) for name, runs in samples.items()}
    base_bytes = (folder / "base.safetensors").stat().st_size
    if "sd-mecha" in commands:
        print_comparison(compare_outputs(Path(base), folder / "out/baked.safetensors", folder / "out/mecha.safetensors"))
    return {"arch": arch_name, "base_bytes": base_bytes, "adapter_bytes": adapters_bytes, **result}


def report(rows: list[dict]) -> None:
    print(
        "\n| arch | checkpoint | adapters | raw copy | safetensors copy | loraforge bake | bake / copy "
        "| sd-mecha bake | sd-mecha / copy | copy RSS | bake RSS | sd-mecha RSS | RSS target (1 GiB + adapters) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        raw_t, _ = row["raw copy"]
        copy_t, copy_rss = row["copy"]
        bake_t, bake_rss = row["loraforge"]
        mecha = "| - | - " if "sd-mecha" not in row else f"| {row['sd-mecha'][0]:.2f} s | {row['sd-mecha'][0] / copy_t:.2f}x "
        mecha_rss = "-" if "sd-mecha" not in row else f"{row['sd-mecha'][1] / 2**20:.0f} MiB"
        target = 2**30 + row["adapter_bytes"]
        print(
            f"| {row['arch']} | {row['base_bytes'] / 2**30:.2f} GiB | {row['adapter_bytes'] / 2**20:.0f} MiB "
            f"| {raw_t:.2f} s | {copy_t:.2f} s | {bake_t:.2f} s | {bake_t / copy_t:.2f}x {mecha}"
            f"| {copy_rss / 2**20:.0f} MiB | {bake_rss / 2**20:.0f} MiB | {mecha_rss} | {target / 2**20:.0f} MiB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=("sd1", "sd2", "sdxl"), help="default: sd1 and sdxl")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mecha-python", metavar="PATH", help="a python with sd-mecha 1.1.x: adds that contender")
    args = parser.parse_args()
    version, note = mecha_version(args.mecha_python)
    print(note, flush=True)
    mecha_python = args.mecha_python if version else None
    rows = [run(arch, args.repeats, mecha_python) for arch in (args.arch or ["sd1", "sdxl"])]
    report(rows)


if __name__ == "__main__":
    main()
