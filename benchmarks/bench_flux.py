"""Benchmark: bake, svd-merge and extract on a full-size Flux.1 dev transformer (bf16, 23.8 GB).

    python benchmarks/bench_flux.py [--small] [--only raw,copy,bake,merge,extract] [--keep]

Inputs, written once and cached under benchmarks/work/flux/ (``flux-small/``
with ``--small``): a synthetic Flux.1 dev transformer in BFL's bare layout
(``double_blocks.0.img_attn.qkv.weight``, ...; every key and shape of
``flux1-dev.safetensors``, 780 tensors, 11.9 G parameters) in BF16, values
from the seeded generator of loraforge.testing.checkpoints, streamed to disk
tensor by tensor (never the whole model in memory); and three LoRAs in three
dialects:

- ``kohya``: kohya/sd-scripts fused names (``lora_unet_double_blocks_0_img_attn_qkv``),
  rank 16, alpha 8, every linear layer of the transformer;
- ``diffusers``: diffusers/PEFT split names as ai-toolkit saves them
  (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, split q/k/v and
  ``proj_mlp``, ``norm_out.linear``; no alpha, scale 1), rank 32, every layer;
- ``comfy``: ComfyUI-prefixed dotted BFL names
  (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``), rank 64,
  alpha 32, the attention layers (``*_attn.qkv``, ``*_attn.proj``) and the
  single blocks' ``linear1`` / ``linear2``.

``--small`` builds the same family at small dimensions (hidden 32, 2 double +
3 single blocks) through the same builders: the whole script runs in seconds,
to check it end to end before the full-size run.

Contenders, each in a fresh process, wall time and peak RSS from wait4's
rusage, one after the other (the measuring process imports neither torch nor
loraforge: Linux counts a forked parent's RSS in the child's ru_maxrss). The
peak anonymous RSS is sampled from /proc twice a second as well: the
safetensors copy memory-maps its input, and the mapped pages count in its RSS
without being memory it needs. A contender past 8 GiB of anonymous memory is
stopped (the box is shared). Before the timings, ``loraforge plan`` fills
loraforge's sha256 cache for the inputs (a first build hashes every input
once for the lock: minutes for 23.8 GB); the timed builds are the rebuild a
user sees, the warm-up's time is printed on its own.

- ``raw copy``: the physical floor - the file's bytes in 8 MiB chunks, fsync, rename;
- ``copy``: a plain streaming safetensors read+write (the baseline the bake
  goal is stated against), fsync, rename;
- ``bake``: ``loraforge build`` of a recipe baking the three LoRAs into the
  transformer (save bfloat16);
- ``merge``: ``loraforge build`` of a ``kind: lora``, ``method: svd`` target
  merging the three into one fused kohya LoRA of rank 32;
- ``extract``: ``loraforge build`` of a ``kind: extract`` target, rank 32,
  tuned = the baked checkpoint, base = the transformer.

One run per contender: at 23.8 GB per pass (more than this machine's RAM, so
no run is served from the page cache) a repeat costs minutes each. Each
output is deleted right after it is measured (the baked checkpoint after the
extraction, which reads it), so at most base + one 23.8 GB output sit on the
disk; a step whose output would not fit in the free space (with a 2 GiB
margin) is skipped with a note. The report prints a Markdown table with the
ratios to the copy and the RSS goal (2 GiB + the adapters' size), the load
average and the free disk space.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from bench_bake import COPY_SCRIPT, SAFETENSORS_COPY_SCRIPT  # noqa: E402  (the same baselines as bench_bake)

SMALL = {"hidden": 32, "head_dim": 8, "depth": 2, "depth_single": 3, "in_channels": 16, "out_channels": 16,
         "context_in": 24, "vec_in": 16}
STEPS = ("raw", "copy", "bake", "merge", "extract")
MARGIN = 2 << 30  # free space left over after an output, at least
# (name, dialect, rank, alpha, strength, seed)
ADAPTERS = (
    ("kohya", "kohya", 16, 8.0, 0.8, 1),
    ("diffusers", "diffusers", 32, None, 0.6, 2),
    ("comfy", "comfy", 64, 32.0, -0.5, 3),
)


def architecture(small: bool):
    from loraforge.formats.arch import get_architecture

    dims = {"all_in_one": 0}  # BFL's bare transformer file (flux1-dev.safetensors)
    if small:
        dims.update(SMALL)
    return get_architecture("flux", dims)


def comfy_targets(arch) -> list[str]:
    """The attention layers and the single blocks' linear1 / linear2 (kohya names)."""
    return [m.kohya for m in arch.modules if "_attn_qkv" in m.kohya or "_attn_proj" in m.kohya
            or m.kohya.endswith(("_linear1", "_linear2"))]


def write_adapter(path: Path, arch, dialect: str, rank: int, alpha: float | None, seed: int) -> None:
    from loraforge.testing.adapters import write_synthetic_adapter
    from loraforge.testing.flux import write_flux_diffusers_lora

    if dialect == "diffusers":
        write_flux_diffusers_lora(path, arch, rank=rank, seed=seed, dtype="BF16")
    elif dialect == "kohya":
        write_synthetic_adapter(path, arch, "lora", rank=rank, alpha=alpha, seed=seed, targets="all",
                                text_encoder=False, dtype="BF16")
    else:  # ComfyUI's dotted names are the table's "diffusers" spelling of a Flux module
        write_synthetic_adapter(path, arch, "lora", rank=rank, alpha=alpha, seed=seed, targets=comfy_targets(arch),
                                text_encoder=False, naming="diffusers", dtype="BF16")


HEADER = """\
loraforge: 1
name: {name}
date: "2026-11-01"
precision: {precision}
inputs:
  base: {{source: base.safetensors}}
"""


def prepare(folder: Path, small: bool) -> None:
    """Inputs (once) and the three recipes."""
    from loraforge.testing.checkpoints import write_synthetic_checkpoint

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out").mkdir(exist_ok=True)
    arch = architecture(small)
    base = folder / "base.safetensors"
    if not base.exists():
        write_synthetic_checkpoint(base, arch, seed=0, dtype="BF16")
        print(f"  generated {base} ({base.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s",
              flush=True)
    for name, dialect, rank, alpha, _, seed in ADAPTERS:
        path = folder / f"{name}.safetensors"
        if not path.exists():
            write_adapter(path, arch, dialect, rank, alpha, seed)
            print(f"  wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) at {time.perf_counter() - started:.0f} s",
                  flush=True)
    inputs = "".join(f"  {name}: {{source: {name}.safetensors}}\n" for name, *_ in ADAPTERS)
    loras = "".join(f"      - {{use: {name}, strength: {s}}}\n" for name, _, _, _, s, _ in ADAPTERS)
    (folder / "bake.yaml").write_text(
        HEADER.format(name="bench-flux-bake", precision="{save: bfloat16}") + inputs
        + "targets:\n  baked:\n    kind: checkpoint\n    base: base\n    loras:\n" + loras
        + "    output: out/baked.safetensors\n"
    )
    (folder / "merge.yaml").write_text(
        HEADER.format(name="bench-flux-merge", precision="{save: bfloat16}") + inputs
        + "targets:\n  merged:\n    kind: lora\n    method: svd\n    rank: 32\n    loras:\n" + loras
        + "    output: out/merged.safetensors\n"
    )
    (folder / "extract.yaml").write_text(
        HEADER.format(name="bench-flux-extract", precision="{compute: float32, save: bfloat16}")
        + "  tuned: {source: out/baked.safetensors}\n"
        + textwrap.dedent(
            """\
            targets:
              extracted:
                kind: extract
                tuned: tuned
                base: base
                rank: 32
                output: out/extracted.safetensors
            """
        )
    )


# A contender whose anonymous memory passes this is stopped: the machine (24 GiB) is shared.
# Anonymous, not VmRSS: the safetensors copy memory-maps the 23.8 GB file, and its mapped
# pages count in its RSS (and in ru_maxrss) although the kernel can drop them at any time.
RSS_KILL = 8 << 30


def _watch(pid: int, stop: threading.Event, killed: list[int], anon: list[int]) -> None:
    """Track the child's anonymous resident memory (anon[0], sampled twice a second); stop it past RSS_KILL."""
    while not stop.wait(0.5):
        try:
            fields = Path(f"/proc/{pid}/status").read_text().split("RssAnon:")[1].split()
        except (OSError, IndexError):
            return
        rss = int(fields[0]) * 1024
        anon[0] = max(anon[0], rss)
        if rss > RSS_KILL:
            killed.append(rss)
            os.kill(pid, signal.SIGKILL)
            return


def timed(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (bytes, wait4) and sampled peak anonymous RSS of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    stop, killed, anon = threading.Event(), [], [0]
    watcher = threading.Thread(target=_watch, args=(process.pid, stop, killed, anon), daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    stop.set()
    watcher.join()
    if killed:
        raise SystemExit(f"stopped after {elapsed:.0f} s at {killed[0] / 2**30:.1f} GiB RSS: {' '.join(command)}")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(command)}")
    return elapsed, usage.ru_maxrss * 1024, anon[0]


def build(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "loraforge.cli", "build", str(recipe), "--quiet", "--device", "cpu"]


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_bake(base: Path, baked: Path) -> None:
    """Same keys, shapes and dtypes as the base; how many tensors the bake changed (one tensor at a time)."""
    import torch

    from loraforge.formats.safetensors_reader import open_safetensors

    changed = 0
    with open_safetensors(base) as fb, open_safetensors(baked) as fo:
        if fb.names() != fo.names():
            raise SystemExit("baked checkpoint: keys differ from the base")
        for key in fb.names():
            a, b = fb.read(key), fo.read(key)
            if a.dtype != b.dtype or a.shape != b.shape:
                raise SystemExit(f"baked checkpoint: {key} is {b.dtype} {tuple(b.shape)}, base {a.dtype} {tuple(a.shape)}")
            changed += not torch.equal(a, b)
        print(f"{changed} of {len(fb.names())} tensors changed, keys/shapes/dtypes as the base")


def helper(*args: str) -> str:
    """This script's --prepare / --check-bake in a child process (its stdout).

    The measuring process never imports torch or loraforge: Linux counts a
    forked parent's RSS in the child's ru_maxrss (the high-water mark
    survives exec), so a heavy parent would inflate every figure.
    """
    done = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout.strip()


def clean(out: Path, keep: Path | None = None) -> None:
    """Remove the outputs (and a killed contender's temporary file), except ``keep``."""
    for path in out.iterdir():
        if path != keep and path.is_file():
            path.unlink()


def run(folder: Path, steps: list[str], keep: bool) -> dict:
    base = folder / "base.safetensors"
    out = folder / "out"
    clean(out, out / "baked.safetensors" if "bake" not in steps else None)
    try:
        return _run(folder, steps)
    finally:
        clean(out, out / "baked.safetensors" if keep else None)


def _run(folder: Path, steps: list[str]) -> dict:
    base = folder / "base.safetensors"
    out = folder / "out"
    base_bytes = base.stat().st_size
    adapter_bytes = sum((folder / f"{n}.safetensors").stat().st_size for n, *_ in ADAPTERS)
    results: dict[str, dict] = {}
    notes: list[str] = []

    def measure(name: str, command: list[str], output: Path, needs: int) -> bool:
        free = free_bytes(folder)
        if free < needs + MARGIN:
            notes.append(f"{name}: skipped, {free / 1e9:.1f} GB free, needs {needs / 1e9:.1f} GB + 2 GiB margin")
            print(f"  {notes[-1]}", flush=True)
            return False
        for lock in folder.glob("*.lock"):  # a lock must never turn a timed build into an up-to-date no-op
            lock.unlink()
        load = os.getloadavg()
        wall, rss, anon = timed(command)
        results[name] = {"wall_s": wall, "rss": rss, "anon": anon, "load": load, "output_bytes": output.stat().st_size,
                         "free_before": free}
        print(f"  {name}: {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB (anonymous {anon / 2**20:.0f} MiB), "
              f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
              f"output {output.stat().st_size / 1e9:.3f} GB", flush=True)
        return True

    if {"bake", "merge"} & set(steps):
        # loraforge hashes every input (sha256, for the lock) once and keeps the hash in its stat-keyed
        # cache; plan does that here, untimed, so the timed builds are the steady state a user's rebuilds
        # see. The first (cold) hash of the 23.8 GB base is reported on its own.
        started = time.perf_counter()
        subprocess.run(build(folder / "bake.yaml")[:3] + ["plan", str(folder / "bake.yaml")], check=True,
                       stdout=subprocess.DEVNULL)
        results_note = f"hash warm-up (loraforge plan of the bake recipe, in no timing): {time.perf_counter() - started:.1f} s"
        notes.append(results_note)
        print(f"  {results_note}", flush=True)
    copy_out = out / "copy.safetensors"
    if "raw" in steps and measure("raw copy", [sys.executable, "-c", COPY_SCRIPT, str(base), str(copy_out)],
                                  copy_out, base_bytes):
        copy_out.unlink()
    if "copy" in steps and measure("copy", [sys.executable, "-c", SAFETENSORS_COPY_SCRIPT, str(base), str(copy_out)],
                                   copy_out, base_bytes):
        copy_out.unlink()
    baked = out / "baked.safetensors"
    if "bake" in steps and measure("bake", build(folder / "bake.yaml"), baked, base_bytes):
        started = time.perf_counter()
        results["bake"]["check"] = helper("--check-bake", str(folder))
        print(f"  bake check: {results['bake']['check']} ({time.perf_counter() - started:.0f} s)", flush=True)
    if "merge" in steps and measure("merge", build(folder / "merge.yaml"), out / "merged.safetensors", adapter_bytes):
        summary = json.loads((out / "merged.merge.json").read_text()).get("summary", {})
        results["merge"]["summary"] = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
        (out / "merged.safetensors").unlink()
    if "extract" in steps:
        if not baked.exists():
            notes.append("extract: skipped, no baked checkpoint (run the bake step first)")
            print(f"  {notes[-1]}", flush=True)
        elif measure("extract", build(folder / "extract.yaml"), out / "extracted.safetensors", adapter_bytes):
            summary = json.loads((out / "extracted.extract.json").read_text()).get("summary", {})
            results["extract"]["summary"] = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
            (out / "extracted.safetensors").unlink()
    return {"base_bytes": base_bytes, "adapter_bytes": adapter_bytes, "results": results, "notes": notes}


def report(row: dict) -> None:
    results = row["results"]
    copy = results.get("copy", {}).get("wall_s")
    goal = 2**31 + row["adapter_bytes"]
    print(f"\ncheckpoint {row['base_bytes'] / 1e9:.2f} GB, adapters {row['adapter_bytes'] / 2**20:.0f} MiB, "
          f"RSS goal (2 GiB + adapters) {goal / 2**20:.0f} MiB")
    print("| contender | wall | / copy | peak RSS (wait4) | peak anonymous RSS (sampled) | within RSS goal "
          "| load (1/5/15 min) at start | output |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['wall_s'] / copy:.2f}x" if copy else "-"
        within = "yes" if r["rss"] <= goal else "NO"
        load = " / ".join(f"{x:.2f}" for x in r["load"])
        print(f"| {name} | {r['wall_s']:.1f} s | {ratio} | {r['rss'] / 2**20:.0f} MiB | {r['anon'] / 2**20:.0f} MiB "
              f"| {within} | {load} "
              f"| {r['output_bytes'] / 2**20:.1f} MiB |")
    for name in ("bake", "merge", "extract"):
        extra = results.get(name, {})
        for field in ("check", "summary"):
            if field in extra:
                print(f"{name} {field}: {json.dumps(extra[field])}")
    for note in row["notes"]:
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small dimensions (seconds): checks the script end to end")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps, default {','.join(STEPS)}")
    parser.add_argument("--keep", action="store_true", help="keep the baked checkpoint (inputs are always kept)")
    parser.add_argument("--prepare", metavar="FOLDER", help=argparse.SUPPRESS)  # child: write the inputs
    parser.add_argument("--check-bake", metavar="FOLDER", help=argparse.SUPPRESS)  # child: compare baked vs base
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), args.small)
        return
    if args.check_bake:
        check_bake(Path(args.check_bake) / "base.safetensors", Path(args.check_bake) / "out" / "baked.safetensors")
        return
    steps = [s for s in args.only.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
    folder = ROOT / "work" / ("flux-small" if args.small else "flux")
    print(f"[flux{' small' if args.small else ''}] preparing inputs in {folder}", flush=True)
    print(helper("--prepare", str(folder), *(["--small"] if args.small else [])), flush=True)
    row = run(folder, steps, args.keep)
    report(row)


if __name__ == "__main__":
    main()
