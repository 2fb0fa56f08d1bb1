"""Benchmark: svd-merge 4 LoRAs (ranks 4-32, one LoCon with 3x3 convs) into rank 32, vs a dense reference.

    python benchmarks/bench_merge.py --arch sd1 [--arch sdxl] [--repeats 2] [--sample 40] [--device cpu]

For each architecture it writes (once, cached under benchmarks/work/merge-<arch>/)
four full-size synthetic F16 adapters of ranks 4, 8, 16 (LoCon: every layer
incl. 3x3 convs) and 32, then:

- ``loraforge``: ``loraforge build`` of a `kind: lora` recipe (method svd,
  rank 32, conv_rank 32), in a fresh process, ``--repeats`` times; wall time
  of the whole command (torch import, planning, reading, merging, writing);
- ``dense reference``: what the common merge scripts do per module - form
  Σ sᵢ·ΔWᵢ densely in float32 and run torch.linalg.svd on it. Timing every
  module takes tens of minutes on a 2-core machine, so it runs on an evenly
  spaced sample of ``--sample`` modules and the total is extrapolated by the
  modules' SVD cost (out·in·min(out, in)); the output says so.
- errors: on the sampled modules, the dense float64 SVD gives the optimal
  rank-32 relative error; the report's error of loraforge's factored SVD is
  compared with it, and its singular values with the dense ones.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from loraforge.formats.arch import get_architecture  # noqa: E402
from loraforge.testing.adapters import write_synthetic_adapter  # noqa: E402

# (name, rank, options, strength)
ADAPTERS = (
    ("style", 32, {"text_encoder": True}, 0.8),
    ("detail", 16, {"text_encoder": False, "targets": "all"}, -0.5),
    ("light", 8, {"text_encoder": True}, 0.6),
    ("grain", 4, {"text_encoder": False}, 1.0),
)


def prepare(arch_name: str) -> Path:
    folder = ROOT / "work" / f"merge-{arch_name}"
    folder.mkdir(parents=True, exist_ok=True)
    arch = get_architecture(arch_name)
    for seed, (name, rank, options, _) in enumerate(ADAPTERS):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            write_synthetic_adapter(path, arch, "lora", rank=rank, seed=seed, dtype="F16", **options)
    lines = [
        "loraforge: 1",
        f"name: bench-merge-{arch_name}",
        'date: "2026-11-01"',
        "precision: {save: float16}",
        "inputs:",
        *(f"  {name}: {{source: {name}.safetensors}}" for name, *_ in ADAPTERS),
        "targets:",
        "  merged:",
        "    kind: lora",
        "    method: svd",
        "    rank: 32",
        "    conv_rank: 32",
        "    loras:",
        *(f"      - {{use: {name}, strength: {strength}}}" for name, _, _, strength in ADAPTERS),
        "    output: out/merged.safetensors",
    ]
    (folder / "bench.yaml").write_text("\n".join(lines) + "\n")
    return folder


def time_loraforge(folder: Path, device: str) -> float:
    output = folder / "out" / "merged.safetensors"
    output.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "loraforge.cli", "build", "-q", "--device", device, str(folder / "bench.yaml")],
        check=True, cwd=ROOT.parent, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def module_factors(folder: Path) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Per kohya module: (up·strength·scale, down) of each adapter, float64 matrices."""
    modules: dict[str, list] = {}
    for name, rank, _, strength in ADAPTERS:
        with safe_open(str(folder / f"{name}.safetensors"), "pt") as handle:
            keys = set(handle.keys())
            for key in sorted(keys):
                if not key.endswith(".lora_up.weight"):
                    continue
                module = key[: -len(".lora_up.weight")]
                up = handle.get_tensor(key).to(torch.float64).flatten(1)
                down = handle.get_tensor(f"{module}.lora_down.weight").to(torch.float64).flatten(1)
                alpha = float(handle.get_tensor(f"{module}.alpha")) if f"{module}.alpha" in keys else down.shape[0]
                modules.setdefault(module, []).append((up * strength * alpha / down.shape[0], down))
    return modules


def svd_cost(out: int, cin: int) -> float:
    return out * cin * min(out, cin)


def dense_reference(folder: Path, sample: int, device: str) -> dict:
    modules = module_factors(folder)
    names = sorted(modules)
    step = max(1, len(names) // sample)
    picked = names[::step][:sample]
    report = {m["name"]: m for m in json.loads((folder / "out" / "merged.merge.json").read_text())["modules"]}
    timed, errors, sigma_gaps = 0.0, [], []
    for name in picked:
        pairs = modules[name]
        start = time.perf_counter()
        dense = sum(up.float().to(device) @ down.float().to(device) for up, down in pairs)  # what the scripts do
        torch.linalg.svd(dense, full_matrices=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timed += time.perf_counter() - start
        exact = sum(up @ down for up, down in pairs)  # float64 reference for the error figures
        s = torch.linalg.svd(exact, full_matrices=False).S
        keep = report[name]["rank"]
        optimal = math.sqrt(float((s[keep:] ** 2).sum() / (s**2).sum())) if float(s[0]) > 0 else 0.0
        errors.append((name, optimal, report[name]["relative_error"], report[name]["saved_relative_error"]))
        ours = torch.tensor(report[name]["singular_values"], dtype=torch.float64)
        sigma_gaps.append(float(((ours - s[: ours.numel()]).abs() / s[0]).max()))
    all_cost = sum(svd_cost(modules[n][0][0].shape[0], modules[n][0][1].shape[1]) for n in names)
    picked_cost = sum(svd_cost(modules[n][0][0].shape[0], modules[n][0][1].shape[1]) for n in picked)
    return {
        "modules": len(names),
        "sampled": len(picked),
        "sampled_seconds": timed,
        "extrapolated_seconds": timed * all_cost / picked_cost,
        "max_relative_error_gap": max(abs(ours - opt) for _, opt, ours, _ in errors),
        "max_saved_error": max(saved for *_, saved in errors),
        "mean_optimal_error": statistics.mean(opt for _, opt, _, _ in errors),
        "max_singular_value_gap": max(sigma_gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=("sd1", "sd2", "sdxl"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sample", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for arch_name in args.arch or ["sd1"]:
        folder = prepare(arch_name)
        times = [time_loraforge(folder, args.device) for _ in range(args.repeats)]
        summary = json.loads((folder / "out" / "merged.merge.json").read_text())["summary"]
        dense = dense_reference(folder, args.sample, args.device)
        ours = statistics.median(times)
        print(f"== {arch_name} on {args.device}: {dense['modules']} modules, 4 LoRAs (ranks 4/8/16 LoCon/32) -> rank 32")
        print(f"loraforge build: median {ours:.2f} s of {len(times)} runs ({', '.join(f'{t:.2f}' for t in times)})")
        print(
            f"dense reference (float32 ΔW + torch.linalg.svd): {dense['sampled_seconds']:.1f} s on "
            f"{dense['sampled']} sampled modules, extrapolated by SVD cost to {dense['extrapolated_seconds']:.0f} s "
            f"for all {dense['modules']} ({dense['extrapolated_seconds'] / ours:.0f}x loraforge)"
        )
        print(
            f"errors: loraforge's float64 relative error minus the optimal (dense float64 SVD) error: max "
            f"{dense['max_relative_error_gap']:.1e}; singular values: max |Δσ|/σ₁ {dense['max_singular_value_gap']:.1e}; "
            f"mean optimal rank-32 error on the sample {dense['mean_optimal_error']:.4f}; "
            f"as saved (F16): max {dense['max_saved_error']:.4f} on the sample, {summary['saved_relative_error_max']:.4f} "
            f"over all modules (mean {summary['saved_relative_error_mean']:.4f})"
        )


if __name__ == "__main__":
    main()
