"""Benchmark: checkpoint merges of 3 full-size SD 1.5 models vs a plain copy and sd-mecha.

    python benchmarks/bench_checkpoint_merge.py [--repeats 1] [--job weighted_sum --job ties]
        [--mecha-python /tmp/mecha-venv/bin/python] [--keep-outputs]

Inputs (written once, cached under benchmarks/work/checkpoint-merge/, streamed
to disk tensor by tensor by loraforge.testing.checkpoints): the full-size
synthetic SD 1.5 F16 checkpoint of bench_bake.py (seed 0, reused from
benchmarks/work/sd1/ by a hard link when it is there) as the base, and three
more of the same family and size with seeds 11, 12, 13 (m1, m2, m3). Two jobs:

- ``weighted_sum``: 0.5·m1 + 0.3·m2 + 0.2·m3;
- ``ties``: TIES of m1, m2, m3 against the base, density 0.2, weights 1,
  lambda 1, disjoint mean (loraforge's defaults);

text encoder, UNet and VAE merged by both tools (loraforge: ``components:
{vae: merge}``), output F16. Each contender runs in a fresh process, timed
side by side in one run:

- ``raw copy`` / ``copy``: the largest input's bytes to a new file (8 MiB
  chunks), and the plain streaming safetensors read+write the targets are
  stated against (both from bench_bake.py), each with fsync, timed again
  before each job;
- ``loraforge``: ``loraforge build`` of the job's target (no lock, so it
  always builds), default threads (every core);
- ``sd-mecha`` (with ``--mecha-python``): the same job through sd-mecha's
  public API (benchmarks/mecha_merge.py), merge dtype float32 (its
  default), output float16, ``threads`` = the core count.

It reports wall time, the ratio to the copy, peak RSS (wait4's rusage of
each child), and how far the two tools' outputs are apart (max abs
difference, elements differing, in float16 steps). For TIES it also counts,
on the largest merged tensors, where the two definitions of the trim differ
(loraforge keeps exactly ⌊density·n⌋ elements of each task vector, ties by
lower index, magnitudes in float64; sd-mecha keeps every float32 magnitude at
or above its kthvalue of rank max(int((1 − density)·n), 1), i.e. one more
and every tie), which explains the differences beyond float32 rounding.
Each job's outputs are compared and deleted before the next job runs (unless
``--keep-outputs``), so a full-size run needs room for two outputs at a time.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from bench_bake import COPY_SCRIPT, SAFETENSORS_COPY_SCRIPT, mecha_version, timed  # noqa: E402

WORK = ROOT / "work" / "checkpoint-merge"
SHARED_BASE = ROOT / "work" / "sd1" / "base.safetensors"  # bench_bake.py's (seed 0, F16)
MECHA_DRIVER = ROOT / "mecha_merge.py"
MODEL_SEEDS = {"m1": 11, "m2": 12, "m3": 13}
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.2
JOBS = ("weighted_sum", "ties")
MERGED_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")  # UNet, text encoder, VAE
TINY = False  # --tiny: the same run on the small test-size SD 1.5 (checks this script, times nothing useful)


def prepare() -> Path:
    """The base, m1..m3 and the recipe (once); returns the recipe path."""
    from loraforge.formats.arch import get_architecture
    from loraforge.testing.arch import tiny_architecture
    from loraforge.testing.checkpoints import write_synthetic_checkpoint

    WORK.mkdir(parents=True, exist_ok=True)
    arch = tiny_architecture("sd1") if TINY else get_architecture("sd1")
    base = WORK / "base.safetensors"
    if not base.exists() and SHARED_BASE.exists() and not TINY:
        os.link(SHARED_BASE, base)  # the same bytes, no second copy on disk
    for name, seed in (("base", 0), *MODEL_SEEDS.items()):
        path = WORK / f"{name}.safetensors"
        if not path.exists():
            started = time.perf_counter()
            write_synthetic_checkpoint(path, arch, seed=seed, dtype="F16")
            print(f"  generated {path} in {time.perf_counter() - started:.1f} s", flush=True)
    recipe = WORK / "bench.yaml"
    inputs = "\n".join(f"  {name}: {{source: {name}.safetensors}}" for name in ("base", *MODEL_SEEDS))
    models = ", ".join(MODEL_SEEDS)
    recipe.write_text(
        textwrap.dedent(
            """\
            loraforge: 1
            name: bench-checkpoint-merge
            date: "2026-11-01"
            seed: 1
            inputs:
            """
        )
        + inputs
        + textwrap.dedent(
            f"""
            targets:
              weighted_sum:
                kind: checkpoint
                merge:
                  method: weighted_sum
                  models: [{models}]
                  weights: {list(WEIGHTS)}
                  components: {{vae: merge}}
                output: out/weighted_sum.safetensors
              ties:
                kind: checkpoint
                merge:
                  method: ties
                  base: base
                  models: [{models}]
                  density: {DENSITY}
                  components: {{vae: merge}}
                output: out/ties.safetensors
            """
        )
    )
    return recipe


def mecha_command(python: str, job: str) -> list[str]:
    models = [f"--model={WORK / f'{name}.safetensors'}" for name in MODEL_SEEDS]
    extra = (
        ["--weights", ",".join(str(w) for w in WEIGHTS)] if job == "weighted_sum"
        else ["--base", str(WORK / "base.safetensors"), "--density", str(DENSITY)]
    )
    return [
        python, str(MECHA_DRIVER), "--config", "sd1-ldm", "--method", job, *models, *extra,
        "--output", str(WORK / f"out/mecha-{job}.safetensors"), "--output-dtype", "float16",
        # loraforge uses every core; sd-mecha gets as many worker threads.
        "--threads", str(os.cpu_count() or 1),
    ]


def compare_outputs(ours: Path, theirs: Path) -> dict:
    """How far two merges of one job are apart, tensor by tensor (streamed)."""
    import torch
    from safetensors import safe_open

    found = dict(only_ours=[], only_theirs=[], dtype_differs=[], tensors=0, elements=0, differing=0,
                 beyond_one_step=0, max_abs=0.0, max_abs_key=None, max_steps=0.0, other_differ=[])
    with safe_open(ours, "pt") as fo, safe_open(theirs, "pt") as ft:
        keys_o, keys_t = set(fo.keys()), set(ft.keys())
        found["only_ours"], found["only_theirs"] = sorted(keys_o - keys_t), sorted(keys_t - keys_o)
        for key in sorted(keys_o & keys_t):
            mine, other = fo.get_tensor(key), ft.get_tensor(key)
            if not key.startswith(MERGED_PREFIXES):
                # noise-schedule buffers, EMA bookkeeping, position ids: loraforge takes them from the first
                # model (they are the same in real checkpoints; the synthetic ones are random per seed)
                if mine.dtype != other.dtype or not torch.equal(mine, other):
                    found["other_differ"].append(f"{key} ({mine.dtype} vs {other.dtype})")
                continue
            if mine.dtype != other.dtype:
                found["dtype_differs"].append(f"{key} ({mine.dtype} vs {other.dtype})")
                continue
            if not mine.is_floating_point():
                continue
            found["tensors"] += 1
            diff = (mine.double() - other.double()).abs()
            found["elements"] += diff.numel()
            found["differing"] += int((diff > 0).sum())
            if diff.numel() and diff.max().item() > found["max_abs"]:
                found["max_abs"], found["max_abs_key"] = diff.max().item(), key
            eps, tiny = torch.finfo(mine.dtype).eps, torch.finfo(mine.dtype).tiny
            steps = diff / (mine.double().abs().clamp_min(tiny) * eps)
            found["beyond_one_step"] += int((steps > 1 + 1e-9).sum())
            if steps.numel():
                found["max_steps"] = max(found["max_steps"], steps.max().item())
    return found


def trim_definitions(count: int = 3) -> list[str]:
    """On the ``count`` largest merged tensors: how many elements each definition of TIES' trim keeps, and
    where the two results differ by more than one float16 step, how many of those elements are kept by one
    definition only in some model (the explanation of the disagreement)."""
    import torch
    from safetensors import safe_open

    lines = []
    paths = [WORK / f"{name}.safetensors" for name in MODEL_SEEDS]
    with safe_open(WORK / "base.safetensors", "pt") as fb, safe_open(WORK / "out/ties.safetensors", "pt") as fo, \
            safe_open(WORK / "out/mecha-ties.safetensors", "pt") as ft:
        handles = [safe_open(p, "pt") for p in paths]
        sizes = sorted(((math.prod(fb.get_slice(k).get_shape()), k) for k in fb.keys()
                        if k.startswith(("model.diffusion_model.", "cond_stage_model.")) and fb.get_slice(k).get_dtype() == "F16"),
                       reverse=True)
        for numel, key in sizes[:count]:
            base = fb.get_tensor(key).double().reshape(-1)
            ours_only = theirs_only = 0
            either = torch.zeros(numel, dtype=torch.bool)
            for handle in handles:
                delta = handle.get_tensor(key).double().reshape(-1) - base
                keep = math.floor(DENSITY * numel)
                order = torch.sort(delta.abs(), descending=True, stable=True).indices[:keep]
                mine = torch.zeros(numel, dtype=torch.bool)
                mine[order] = True
                single = delta.float().abs()
                rank = max(int((1 - DENSITY) * numel), 1)
                theirs = single >= single.kthvalue(rank).values
                ours_only += int((mine & ~theirs).sum())
                theirs_only += int((theirs & ~mine).sum())
                either |= mine != theirs
            mine_out = fo.get_tensor(key).double().reshape(-1)
            other_out = ft.get_tensor(key).double().reshape(-1)
            steps = (mine_out - other_out).abs() / (mine_out.abs().clamp_min(2.0**-14) * 2.0**-10)
            far = steps > 1 + 1e-9
            lines.append(
                f"{key} ({numel:,} elements): trim kept by loraforge only {ours_only}, by sd-mecha only {theirs_only} "
                f"(3 models); {int(far.sum())} elements differ by more than one float16 step, "
                f"{int((far & either).sum())} of them where the trims differ"
            )
        for handle in handles:
            del handle
    return lines


def run(jobs: list[str], repeats: int, mecha_python: str | None, keep: bool) -> dict:
    """Per job: the copy, loraforge and sd-mecha side by side, then the outputs compared and deleted (a
    full-size run needs room for two 2 GiB outputs at a time, not six)."""
    print("preparing inputs", flush=True)
    recipe = prepare()
    out = WORK / "out"
    out.mkdir(exist_ok=True)
    largest = max((WORK / f"{name}.safetensors" for name in ("base", *MODEL_SEEDS)), key=lambda p: p.stat().st_size)
    copies = {
        "raw copy": [sys.executable, "-c", COPY_SCRIPT, str(largest), str(out / "raw-copy.safetensors")],
        "copy": [sys.executable, "-c", SAFETENSORS_COPY_SCRIPT, str(largest), str(out / "copy.safetensors")],
    }
    timed(copies["raw copy"])  # warm the page cache for every contender alike
    (out / "raw-copy.safetensors").unlink()
    load = os.getloadavg()
    samples: dict[str, list[tuple[float, int]]] = {}
    comparisons = {}

    def sample(name: str, command: list[str], written: Path | None = None) -> None:
        # A lock from the previous run must never turn a timed build into an up-to-date no-op.
        recipe.with_suffix(".lock").unlink(missing_ok=True)
        samples.setdefault(name, []).append(timed(command))
        print(f"  {name}: {samples[name][-1][0]:.2f} s, peak RSS {samples[name][-1][1] / 2**20:.0f} MiB", flush=True)
        if written is not None:
            written.unlink()

    for job in jobs:
        for _ in range(repeats):
            for name, command in copies.items():
                sample(f"{name} ({job})", command, out / f"{name.replace(' ', '-')}.safetensors")
            sample(f"loraforge {job}", [sys.executable, "-m", "loraforge.cli", "build", str(recipe), job, "--quiet", "--device", "cpu"])
            if mecha_python:
                sample(f"sd-mecha {job}", mecha_command(mecha_python, job))
        if mecha_python:
            # In a child process: wait4's ru_maxrss of every later child counts this process's RSS at fork
            # time, so the tensors a comparison loads here would inflate the next contenders' peak RSS.
            compare = [sys.executable, __file__, "--compare", job] + (["--tiny"] if TINY else [])
            comparisons[job] = subprocess.run(compare, check=True).returncode
        if not keep:
            for path in out.glob("*.safetensors"):
                path.unlink()
    load = (load, os.getloadavg())
    result = {name: (statistics.median(s[0] for s in runs), max(s[1] for s in runs)) for name, runs in samples.items()}
    return {"largest_bytes": largest.stat().st_size, "load": load, "result": result, "comparisons": comparisons}


def print_comparison(job: str, found: dict) -> None:
    share = found["differing"] / max(found["elements"], 1)
    print(
        f"  {job}, loraforge vs sd-mecha: keys only in ours {len(found['only_ours'])} {found['only_ours'][:3]}, "
        f"only in sd-mecha's {len(found['only_theirs'])} {found['only_theirs'][:3]}, dtype differs {found['dtype_differs'][:3]}; "
        f"{found['tensors']} float tensors: max abs difference {found['max_abs']:.3g} (at {found['max_abs_key']}), "
        f"{found['differing']:,} of {found['elements']:,} elements differ ({share:.4%}), "
        f"{found['beyond_one_step']:,} by more than one float16 step (at most {found['max_steps']:.3g} steps)",
        flush=True,
    )
    if found["other_differ"]:
        print(f"  {job}: {len(found['other_differ'])} other tensors differ (sd-mecha merges or converts them, loraforge "
              f"keeps the first model's): {found['other_differ'][:4]}", flush=True)


def report(row: dict, jobs: list[str]) -> None:
    result = row["result"]
    (l1, l5, l15), (e1, e5, e15) = row["load"]
    print(f"\nload average before {l1:.2f} {l5:.2f} {l15:.2f}, after {e1:.2f} {e5:.2f} {e15:.2f}; "
          f"largest input {row['largest_bytes'] / 2**30:.2f} GiB")
    print("| job | raw copy | safetensors copy | loraforge | loraforge / copy | sd-mecha | sd-mecha / copy "
          "| copy RSS | loraforge RSS | sd-mecha RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for job in jobs:
        raw_t, _ = result[f"raw copy ({job})"]
        copy_t, copy_rss = result[f"copy ({job})"]
        ours_t, ours_rss = result[f"loraforge {job}"]
        mecha = result.get(f"sd-mecha {job}")
        mecha_cells = "- | - " if mecha is None else f"{mecha[0]:.2f} s | {mecha[0] / copy_t:.2f}x "
        mecha_rss = "-" if mecha is None else f"{mecha[1] / 2**20:.0f} MiB"
        print(f"| {job} | {raw_t:.2f} s | {copy_t:.2f} s | {ours_t:.2f} s | {ours_t / copy_t:.2f}x | {mecha_cells}"
              f"| {copy_rss / 2**20:.0f} MiB | {ours_rss / 2**20:.0f} MiB | {mecha_rss} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", action="append", choices=JOBS, help="default: both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mecha-python", metavar="PATH", help="a python with sd-mecha 1.1.x: adds that contender")
    parser.add_argument("--keep-outputs", action="store_true", help="leave the merged files under benchmarks/work/")
    parser.add_argument("--tiny", action="store_true", help="small test-size models (checks the script only)")
    parser.add_argument("--compare", choices=JOBS, help=argparse.SUPPRESS)  # the comparison step of run()
    args = parser.parse_args()
    if args.tiny:
        global WORK, TINY
        WORK, TINY = WORK.with_name("checkpoint-merge-tiny"), True
    if args.compare:
        out = WORK / "out"
        print_comparison(args.compare, compare_outputs(out / f"{args.compare}.safetensors", out / f"mecha-{args.compare}.safetensors"))
        if args.compare == "ties":
            for line in trim_definitions():
                print(f"  ties trim: {line}", flush=True)
        return
    version, note = mecha_version(args.mecha_python)
    print(note, flush=True)
    jobs = args.job or list(JOBS)
    row = run(jobs, args.repeats, args.mecha_python if version else None, args.keep_outputs)
    report(row, jobs)


if __name__ == "__main__":
    main()
