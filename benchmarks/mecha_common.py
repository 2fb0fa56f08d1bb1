"""What benchmarks/mecha_bake.py and mecha_merge.py share: sd-mecha's dtypes and one merge call.

Runs in sd-mecha's own environment (see bench_bake.py), next to those
scripts; like them it imports nothing from loraforge.
"""

from __future__ import annotations

import os

import torch

import sd_mecha

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def merge_to_file(recipe, args) -> None:
    """sd-mecha's merge of ``recipe`` on the CPU into ``args.output``, fsynced like every contender's output.

    ``args``: merge_dtype, output_dtype, threads, progress, output (the scripts' command-line options).
    """
    progress = {} if args.progress else {"tqdm": _silent_tqdm}
    sd_mecha.merge(
        recipe,
        merge_device="cpu",
        merge_dtype=DTYPES[args.merge_dtype],
        output_device="cpu",
        output_dtype=DTYPES[args.output_dtype],
        threads=args.threads,
        **progress,
        output=os.path.abspath(args.output),
    )
    with open(args.output, "rb+") as written:
        os.fsync(written.fileno())


def _silent_tqdm(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, disable=True, **kwargs)
