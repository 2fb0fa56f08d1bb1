"""sd-mecha contender of bench_bake.py: bake kohya LoRAs into a checkpoint with sd-mecha.

Runs under a Python that has sd-mecha (1.1.x) installed, not loraforge's:

    /tmp/mecha-venv/bin/python benchmarks/mecha_bake.py --config sd1-ldm \\
        --base base.safetensors --lora style.safetensors=0.8 ... --output out.safetensors

It only uses sd-mecha's public API: ``sd_mecha.model`` for the base and each
LoRA, ``sd_mecha.convert`` of each LoRA to the base's config (kohya LoRA ->
kohya delta -> LDM/SGM keys), sd-mecha's registered ``add_difference`` merge
method (W + strength * delta, in the merge dtype), and ``sd_mecha.merge(...,
output=path)`` with device cpu. It deliberately imports nothing from loraforge.

Two work-arounds for sd-mecha 1.1.x (checked in 1.1.2, 1.1.7 and 1.1.8):

- ``sd_mecha.add_difference`` (the wrapper exported at top level) compares
  merge spaces before they are solved and fails with "AttributeError:
  'NoneType' object has no attribute 'identifier'" whenever its second
  argument is a conversion node, i.e. on the README's own LoRA example. We
  call the registered merge method it wraps and add the same ``| a``
  fallback it adds (keys a LoRA does not touch keep the running result).
- The SD1 kohya->LDM converter indexes its key relation as a mapping
  (``relation["kohya_sd"]``), which ``RealizedKeyRelation`` does not support:
  "TypeError: 'RealizedKeyRelation' object is not subscriptable". We give
  the class the one ``__getitem__`` it expects (returning ``.inputs[name]``,
  what the SDXL converter reads); no math changes.

sd-mecha writes its output in place without fsync; we fsync it afterwards so
it pays the same durability cost as the other contenders.
"""

from __future__ import annotations

import argparse
import os

import sd_mecha
from sd_mecha.extensions import merge_methods

from mecha_common import DTYPES, merge_to_file
from sd_mecha.keys_map import RealizedKeyRelation

# The LoRA model config sd-mecha registers for kohya-named LoRAs of each base config.
LORA_CONFIGS = {"sd1-ldm": "sd1-kohya_kohya_lora", "sdxl-sgm": "sdxl-kohya_kohya_lora"}


def _patch_relation_indexing() -> None:
    """Work-around for sd-mecha 1.1.x's SD1 kohya converter (see the module docstring)."""
    if not hasattr(RealizedKeyRelation, "__getitem__"):
        RealizedKeyRelation.__getitem__ = lambda self, name: self.inputs[name]


def build_recipe(base_path: str, config: str, loras: list[tuple[str, float]]):
    """W + sum_i s_i * delta_i, one add_difference per LoRA, untouched keys falling back."""
    add_difference = merge_methods.resolve("add_difference")
    base = sd_mecha.model(base_path, config)
    recipe = base
    for path, strength in loras:
        delta = sd_mecha.convert(sd_mecha.model(path, LORA_CONFIGS[config]), base)
        recipe = add_difference(recipe, delta, alpha=strength) | recipe
    return recipe


def _lora_argument(text: str) -> tuple[str, float]:
    path, _, strength = text.rpartition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"expected PATH=STRENGTH, got {text!r}")
    return path, float(strength)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=sorted(LORA_CONFIGS))
    parser.add_argument("--base", required=True)
    parser.add_argument("--lora", required=True, action="append", type=_lora_argument, help="PATH=STRENGTH")
    parser.add_argument("--output", required=True)
    parser.add_argument("--output-dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--merge-dtype", default="float32", choices=sorted(DTYPES), help="sd-mecha's default: float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    _patch_relation_indexing()
    recipe = build_recipe(args.base, args.config, args.lora)
    merge_to_file(recipe, args)



if __name__ == "__main__":
    main()
