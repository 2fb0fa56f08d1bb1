"""LyCORIS LoKr: ΔW = scale · kron(w1, w2), each factor full or factorised.

Keys (``lycoris/modules/lokr.py``): ``<name>.lokr_w1`` [a,c] or
``lokr_w1_a`` [a,r] @ ``lokr_w1_b`` [r,c]; ``lokr_w2`` [b,d(,kh,kw)] or
``lokr_w2_a`` [b,r] @ ``lokr_w2_b`` [r,d] / [r,d·kh·kw] / [r,d,kh,kw], or the
Tucker form ``lokr_t2`` [r,r,kh,kw] with ``lokr_w2_a`` [r,b], ``lokr_w2_b`` [r,d].
ΔW is [a·b, c·d(,kh,kw)]. Rank is the ``_b`` factor's first axis; scale is
alpha / rank when any factor is factorised and 1 when both are full.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraforge.ops import deltas, exact

from .kind import AdapterKind
from .model import AdapterModule, ModuleKeys, rank_mismatch

KIND = "lokr"
SUFFIXES = {
    s: s for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
}


def build(mk: ModuleKeys) -> AdapterModule:
    if "lokr_t1" in mk.keys:
        raise mk.error(
            "has lokr_t1, a Tucker core on the small factor, which LyCORIS never writes",
            "loraforge reads LoKr files as LyCORIS writes them; re-export the adapter with LyCORIS.",
        )
    w1, rank1 = _factor(mk, "1")
    w2, rank2 = _factor(mk, "2")
    if rank1 is not None and rank2 is not None and rank1 != rank2:
        raise rank_mismatch(mk, "lokr_w1_b", 0, "lokr_w2_b", 0)
    rank = rank2 if rank2 is not None else rank1
    tucker = "lokr_t2" in mk.keys
    return mk.build(kind=KIND, scale=deltas.lokr_scale(mk.alpha, rank), tucker=tucker, rank=rank, delta_shape=deltas.lokr_delta_shape(w1, w2))


def _factor(mk: ModuleKeys, which: str) -> tuple[tuple[int, ...], int | None]:
    """(factor shape, rank or None when full) of w1 or w2, checking that exactly one form is present."""
    full, a, b, t = f"lokr_w{which}", f"lokr_w{which}_a", f"lokr_w{which}_b", f"lokr_t{which}"
    if full in mk.keys:
        if a in mk.keys or b in mk.keys:
            raise mk.error(
                f"has both the full factor {mk.keys[full]} and a factorised {a}/{b}",
                "A LoKr factor is either full or factorised, never both; re-export the adapter.",
            )
        return mk.ndim_in(full, (2,) if which == "1" else (2, 3, 4, 5)), None
    mk.require(a, b)
    a_shape = mk.ndim_in(a, (2,))
    if t in mk.keys:
        b_shape = mk.ndim_in(b, (2,))
        t_shape = mk.ndim_in(t, (3, 4, 5))
        if t_shape[0] != a_shape[0]:
            raise rank_mismatch(mk, t, 0, a, 0)
        if t_shape[1] != b_shape[0]:
            raise rank_mismatch(mk, t, 1, b, 0)
        return deltas.lokr_factor_shape(None, a_shape, b_shape, t_shape), b_shape[0]
    b_shape = mk.ndim_in(b, (2,) if which == "1" else (2, 3, 4, 5))
    if a_shape[1] != b_shape[0]:
        raise rank_mismatch(mk, a, 1, b, 0)
    return deltas.lokr_factor_shape(None, a_shape, b_shape), b_shape[0]


def natural_delta(module: AdapterModule, factors: dict[str, Tensor], dtype: torch.dtype, fixed_order: bool = False) -> Tensor:
    w1 = deltas.lokr_factor(factors.get("lokr_w1"), factors.get("lokr_w1_a"), factors.get("lokr_w1_b"), dtype=dtype, fixed_order=fixed_order)
    w2 = deltas.lokr_factor(
        factors.get("lokr_w2"),
        factors.get("lokr_w2_a"),
        factors.get("lokr_w2_b"),
        factors.get("lokr_t2"),
        dtype=dtype,
        fixed_order=fixed_order,
    )
    return deltas.lokr_delta(w1, w2, scale=module.scale)


def natural_exact(module: AdapterModule, factors: dict[str, Tensor]) -> tuple[int, exact.ElementFunction]:
    """(rounding depth, exact natural-ΔW element by flat index, scale excluded)."""
    w1 = (factors.get("lokr_w1"), factors.get("lokr_w1_a"), factors.get("lokr_w1_b"), None)
    w2 = (factors.get("lokr_w2"), factors.get("lokr_w2_a"), factors.get("lokr_w2_b"), factors.get("lokr_t2"))
    shapes = [deltas.lokr_factor_shape(*(None if t is None else tuple(t.shape) for t in w)) for w in (w1, w2)]
    w1_shape, w2_shape = shapes[0], shapes[1]
    return exact.lokr_depth(w1, w2), lambda index: exact.lokr_element(w1, w2, w1_shape, w2_shape, index)


class LokrKind(AdapterKind):
    """LyCORIS LoKr: scale·kron(w1, w2), each factor full, a @ b, or Tucker."""

    name = KIND
    family = "lokr"
    suffixes = SUFFIXES

    build = staticmethod(build)

    scale = staticmethod(deltas.lokr_scale)
    label_text = "LoKr"

    natural_delta = staticmethod(natural_delta)
    natural_exact = staticmethod(natural_exact)
