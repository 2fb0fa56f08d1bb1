"""Refusing LoRA outputs (merges, extractions) whose factors overflow the save dtype.

A factor element beyond the save dtype's range becomes ±inf when rounded
(an extreme strength, alpha or input factor; a fine-tune whose difference
is huge), and every weight a reader bakes from it turns into inf/NaN. The
executors check the factors as they will be saved, before anything is
written, and stop with one paragraph naming the target, the first such
tensor and its count. Bakes check each output tensor in execute/bake.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from loraforge.errors import BuildError
from loraforge.formats import dtypes
from loraforge.formats.lora_output import LoraModuleFactors, module_tensors
from loraforge.ops.finite import nonfinite_counts


def refuse_overflowing_factors(target: str, output: Path, modules: Sequence[LoraModuleFactors], save: str, hint: str) -> None:
    """BuildError when a factor of ``modules``, rounded to ``save`` (a dtype code), holds inf or NaN."""
    dtype = dtypes.torch_dtype(save)
    bad = []
    for module in sorted(modules, key=lambda m: m.name):
        for name, tensor in module_tensors(module, dtype).items():
            nan, inf = nonfinite_counts(tensor)
            if nan or inf:
                bad.append((name, nan + inf, tensor.numel()))
    if not bad:
        return
    name, count, total = bad[0]
    more = f" ({len(bad) - 1} more tensors too)" if len(bad) > 1 else ""
    largest = f"{torch.finfo(dtype).max:.6g}" if dtype.is_floating_point else "?"
    kept = "; the previous output is unchanged" if Path(output).exists() else ""
    raise BuildError(
        f"target '{target}': tensor {name} would hold {count:,} infinite or NaN values of {total:,}{more}: "
        f"the values exceed the largest {save} number ({largest}). {hint} Nothing was written{kept}. "
        "Fix the recipe or the input, or save in a wider dtype (precision: {save: float32})."
    )
