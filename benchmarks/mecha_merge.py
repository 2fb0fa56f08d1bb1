"""sd-mecha contender of bench_checkpoint_merge.py: merge checkpoints with sd-mecha.

Runs under a Python that has sd-mecha (1.1.x) installed, not loraforge's:

    /tmp/mecha-venv/bin/python benchmarks/mecha_merge.py --config sd1-ldm --method weighted_sum \\
        --model m1.safetensors --model m2.safetensors --model m3.safetensors --weights 0.5,0.3,0.2 \\
        --output out.safetensors
    /tmp/mecha-venv/bin/python benchmarks/mecha_merge.py --config sd1-ldm --method ties --base base.safetensors \\
        --model m1.safetensors --model m2.safetensors --model m3.safetensors --density 0.2 --output out.safetensors

It uses sd-mecha's public API only (``sd_mecha.model``, its registered merge
methods, ``sd_mecha.merge(..., output=path)`` with device cpu) and imports
nothing from loraforge:

- ``weighted_sum`` of N models with weights w1..wN (summing to 1): sd-mecha's
  two-model ``weighted_sum`` (``torch.lerp(a, b, alpha)``) nested the way its
  users chain it: lerp(... lerp(m1, m2, w2 / (w1 + w2)) ..., mN, wN), each
  step in the merge dtype (float32 by default).
- ``ties``: task vectors ``subtract(mᵢ, base)``, sd-mecha's ``ties_sum``
  (extensions/builtin/merge_methods/ties.py: ``filter_top_k`` keeps the
  magnitudes at or above the float32 ``kthvalue`` of rank max(int((1 − k)·n), 1),
  sign election, disjoint mean over the agreeing models) with ``k`` = density
  and ``vote_sgn=True`` (the sign of the summed trimmed deltas, the TIES
  paper's "sum" election that loraforge implements; sd-mecha's default
  ``vote_sgn=False`` elects by counting signs), then ``add_difference(base,
  ·, alpha=λ)``: what its ``add_difference_ties`` wrapper builds, with the
  election switched.

sd-mecha writes its output in place without fsync; we fsync it afterwards so
it pays the same durability cost as the other contenders.
"""

from __future__ import annotations

import argparse
import os

import sd_mecha
from sd_mecha.extensions import merge_methods

from mecha_common import DTYPES, merge_to_file



def weighted_sum_recipe(models: list, weights: list[float]):
    """Σ wᵢ·mᵢ (weights summing to 1) as nested lerps: the running mean of the first i models, then the next."""
    lerp = merge_methods.resolve("weighted_sum")
    recipe, total = models[0], weights[0]
    for model, weight in zip(models[1:], weights[1:]):
        total += weight
        recipe = lerp(recipe, model, alpha=weight / total)
    return recipe


def ties_recipe(base, models: list, density: float, scale: float):
    subtract = merge_methods.resolve("subtract")
    ties_sum = merge_methods.resolve("ties_sum")
    add_difference = merge_methods.resolve("add_difference")
    deltas = [subtract(model, base) for model in models]
    return add_difference(base, ties_sum(*deltas, k=density, vote_sgn=True), alpha=scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--method", required=True, choices=("weighted_sum", "ties"))
    parser.add_argument("--model", required=True, action="append")
    parser.add_argument("--base")
    parser.add_argument("--weights", help="comma-separated, one per model (weighted_sum)")
    parser.add_argument("--density", type=float, default=0.2, help="ties: fraction of each task vector kept")
    parser.add_argument("--scale", type=float, default=1.0, help="ties: lambda")
    parser.add_argument("--output", required=True)
    parser.add_argument("--output-dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--merge-dtype", default="float32", choices=sorted(DTYPES), help="sd-mecha's default: float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    models = [sd_mecha.model(path, args.config) for path in args.model]
    if args.method == "weighted_sum":
        weights = [float(w) for w in args.weights.split(",")]
        if len(weights) != len(models):
            parser.error("--weights needs one value per --model")
        recipe = weighted_sum_recipe(models, weights)
    else:
        if not args.base:
            parser.error("ties needs --base")
        recipe = ties_recipe(sd_mecha.model(args.base, args.config), models, args.density, args.scale)
    merge_to_file(recipe, args)



if __name__ == "__main__":
    main()
