"""LyCORIS LoHa (Hadamard product of two low-rank products), plain and Tucker.

Keys: ``<name>.hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``
(plain: w?a [out,r], w?b [r,in] or, for convs, [r,in·kh·kw]); Tucker adds
``hada_t1``, ``hada_t2`` [r,r,kh,kw] with w?a [r,out], w?b [r,in]
(``lycoris/modules/loha.py``). Rank = w1_b.shape[0]; scale = alpha / rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraforge.ops import deltas, exact

from .kind import AdapterKind
from .model import AdapterModule, ModuleKeys, rank_mismatch

KIND = "loha"
SUFFIXES = {s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}


def build(mk: ModuleKeys) -> AdapterModule:
    mk.require("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    tucker = "hada_t1" in mk.keys or "hada_t2" in mk.keys
    if tucker:
        mk.require("hada_t1", "hada_t2")
        shape = _check_tucker_half(mk, "1")
        if _check_tucker_half(mk, "2") != shape:
            raise _halves_disagree(mk)
    else:
        shape = _check_plain_half(mk, "1")
        if _check_plain_half(mk, "2") != shape:
            raise _halves_disagree(mk)
    rank = mk.shapes["hada_w1_b"][0]
    return mk.build(kind=KIND, scale=deltas.lora_scale(mk.alpha, rank), tucker=tucker, rank=rank, delta_shape=shape)


def _check_plain_half(mk: ModuleKeys, half: str) -> tuple[int, ...]:
    a, b = f"hada_w{half}_a", f"hada_w{half}_b"
    a_shape = mk.ndim_in(a, (2,))
    b_shape = mk.ndim_in(b, (2, 4))
    if a_shape[1] != b_shape[0]:
        raise rank_mismatch(mk, a, 1, b, 0)
    return deltas.loha_delta_shape(a_shape, b_shape)


def _check_tucker_half(mk: ModuleKeys, half: str) -> tuple[int, ...]:
    a, b, t = f"hada_w{half}_a", f"hada_w{half}_b", f"hada_t{half}"
    a_shape = mk.ndim_in(a, (2,))
    b_shape = mk.ndim_in(b, (2,))
    t_shape = mk.ndim_in(t, (3, 4, 5))
    if t_shape[0] != a_shape[0]:
        raise rank_mismatch(mk, t, 0, a, 0)
    if t_shape[1] != b_shape[0]:
        raise rank_mismatch(mk, t, 1, b, 0)
    return deltas.loha_delta_shape(a_shape, b_shape, t_shape)


def _halves_disagree(mk: ModuleKeys):
    shapes = ", ".join(f"{mk.keys[r]} {list(s)}" for r, s in sorted(mk.shapes.items()) if r.startswith("hada_"))
    return mk.error(
        f"has two Hadamard halves that imply different ΔW shapes ({shapes})",
        "Both halves of a LoHa describe the same layer; re-export the adapter.",
    )


def natural_delta(module: AdapterModule, factors: dict[str, Tensor], dtype: torch.dtype, fixed_order: bool = False) -> Tensor:
    return deltas.loha_delta(
        factors["hada_w1_a"],
        factors["hada_w1_b"],
        factors["hada_w2_a"],
        factors["hada_w2_b"],
        scale=module.scale,
        t1=factors.get("hada_t1"),
        t2=factors.get("hada_t2"),
        dtype=dtype,
        fixed_order=fixed_order,
    )


def natural_exact(module: AdapterModule, factors: dict[str, Tensor]) -> tuple[int, exact.ElementFunction]:
    """(rounding depth, exact natural-ΔW element by flat index, scale excluded)."""
    w1a, w1b, w2a, w2b = (factors[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    t1, t2 = factors.get("hada_t1"), factors.get("hada_t2")
    tucker = t1 is not None and t2 is not None
    return exact.loha_depth(w1a, w2a, tucker), lambda index: exact.loha_element(w1a, w1b, w2a, w2b, t1, t2, index)


class LohaKind(AdapterKind):
    """LyCORIS LoHa: scale·(w1a@w1b)⊙(w2a@w2b), plain or Tucker halves."""

    name = KIND
    family = "loha"
    suffixes = SUFFIXES

    build = staticmethod(build)

    scale = staticmethod(deltas.lora_scale)
    label_text = "LoHa"

    natural_delta = staticmethod(natural_delta)
    natural_exact = staticmethod(natural_exact)
