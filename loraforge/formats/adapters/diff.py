"""Full weight differences: ``<name>.diff`` (ΔW itself) and optional ``<name>.diff_b`` (Δbias).

Written by LyCORIS "full" training (``lycoris/modules/full.py``) and by
extraction tools; no factors, no alpha, scale 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraforge.ops import deltas, exact

from .kind import AdapterKind
from .model import AdapterModule, ModuleKeys

KIND = "diff"
SUFFIXES = {"diff": "diff", "diff_b": "diff_b"}


def build(mk: ModuleKeys) -> AdapterModule:
    mk.require("diff")
    shape = mk.ndim_in("diff", (1, 2, 3, 4, 5))
    if "diff_b" in mk.keys:
        bias = mk.ndim_in("diff_b", (1,))
        if bias[0] != shape[0]:
            raise mk.error(
                f"has {mk.keys['diff_b']} of length {bias[0]} but {mk.keys['diff']} has {shape[0]} output rows",
                "A bias difference has one value per output row; re-export the adapter.",
            )
    if mk.alpha is not None:
        raise mk.error(
            "has an alpha next to a full difference, which has no rank to scale by",
            "Remove the alpha tensor, or check that the file is not two adapters merged by name.",
        )
    return mk.build(kind=KIND, scale=1.0, tucker=False, rank=None, delta_shape=shape)


def natural_delta(module: AdapterModule, factors: dict[str, Tensor], dtype: torch.dtype, fixed_order: bool = False) -> Tensor:
    return deltas.diff_delta(factors["diff"], dtype=dtype)


def natural_exact(module: AdapterModule, factors: dict[str, Tensor]) -> tuple[int, exact.ElementFunction]:
    """(rounding depth 0: the stored difference is exact; its element by flat index)."""
    flat = factors["diff"].reshape(-1)
    return 0, lambda index: exact.dyadic_sum([(flat[index].item(),)])


class DiffKind(AdapterKind):
    """A full difference (``.diff``, ``.diff_b`` for the bias): ΔW as stored, scale 1."""

    name = KIND
    family = "diff"
    suffixes = SUFFIXES
    exact_shape = True
    takes_dora = False

    build = staticmethod(build)

    label_text = "diff"

    def scale(self, alpha, rank):
        return 1.0

    natural_delta = staticmethod(natural_delta)
    natural_exact = staticmethod(natural_exact)
