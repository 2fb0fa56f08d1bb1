"""Exact values of single ΔW elements, for the few elements certified rounding cannot decide.

Pure arithmetic on the stored numbers: every float is a dyadic rational, so
sums of products are computed exactly with Python integers and returned as a
:class:`fractions.Fraction`. Each function mirrors the formula of its kind in
:mod:`loraforge.ops.deltas` for one element of the *natural* ΔW (the shape
the factors imply), addressed by its flat index, scale excluded (the caller
multiplies by the exact scale and coefficient). Each kind also states its
rounding depth: how many roundings the float64 evaluation in ``deltas`` can
apply along any one product (Higham's n in γ_n), which the certified bound
uses with the kind's envelope (the same formula on absolute values).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, Sequence

from torch import Tensor


ElementFunction = Callable[[int], Fraction]  # flat index of the natural ΔW -> its exact value


def dyadic_sum(products: Sequence[Sequence[float]]) -> Fraction:
    """Σ over ``products`` of the product of each sequence's floats, exactly."""
    terms = []
    for factors in products:
        numerator, exponent = 1, 0
        for value in factors:
            top, bottom = float(value).as_integer_ratio()
            numerator *= top
            exponent += bottom.bit_length() - 1  # bottom is a power of two
        terms.append((numerator, exponent))
    if not terms:
        return Fraction(0)
    common = max(exponent for _, exponent in terms)
    total = sum(numerator << (common - exponent) for numerator, exponent in terms)
    return Fraction(total, 1 << common)


def _unravel(index: int, shape: Sequence[int]) -> list[int]:
    position = []
    for size in reversed(shape):
        position.append(index % size)
        index //= size
    return position[::-1]


def _matrix(tensor: Tensor) -> Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def product_element(a: Tensor, b: Tensor, row: int, column: int) -> Fraction:
    """(a @ b)[row, column] for a (m, r) and b (r, n) exactly."""
    left = a[row].tolist()
    right = b[:, column].tolist()
    return dyadic_sum(list(zip(left, right)))


def tucker_element(core: Tensor, a: Tensor, b: Tensor, p: int, q: int, rest: Sequence[int]) -> Fraction:
    """Σ_ij core[i,j,rest]·a[i,p]·b[j,q] exactly (LyCORIS ``rebuild_tucker``)."""
    plane = core[(slice(None), slice(None), *rest)].tolist()
    left = a[:, p].tolist()
    right = b[:, q].tolist()
    return dyadic_sum([(plane[i][j], left[i], right[j]) for i in range(len(left)) for j in range(len(right))])


# --------------------------------------------------------------------------- kinds


def lora_element(up: Tensor, down: Tensor, mid: Tensor | None, index: int) -> Fraction:
    """Natural ΔW element of LoRA/LoCon (Tucker core optional), scale excluded."""
    up2 = _matrix(up)
    if mid is None:
        down2 = _matrix(down)
        return product_element(up2, down2, index // down2.shape[1], index % down2.shape[1])
    down2 = _matrix(down)
    o, c, *rest = _unravel(index, (up2.shape[0], down2.shape[1], *mid.shape[2:]))
    plane = mid[(slice(None), slice(None), *rest)].tolist()
    left = up2[o].tolist()
    right = down2[:, c].tolist()
    return dyadic_sum([(left[i], plane[i][j], right[j]) for i in range(len(left)) for j in range(len(right))])


def lora_depth(up: Tensor, mid: Tensor | None) -> int:
    rank = int(up.shape[1]) if up.dim() > 1 else 1
    return rank * (rank if mid is not None else 1) + 4


def loha_element(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, t1: Tensor | None, t2: Tensor | None, index: int) -> Fraction:
    """Natural ΔW element of LoHa: (w1a@w1b)⊙(w2a@w2b), or the Tucker halves; scale excluded."""
    if t1 is not None and t2 is not None:
        p, q, *rest = _unravel(index, (w1a.shape[1], w1b.shape[1], *t1.shape[2:]))
        return tucker_element(t1, w1a, w1b, p, q, rest) * tucker_element(t2, w2a, w2b, p, q, rest)
    b1, b2 = _matrix(w1b), _matrix(w2b)
    row, column = index // b1.shape[1], index % b1.shape[1]
    return product_element(w1a, b1, row, column) * product_element(w2a, b2, row, column)


def loha_depth(w1a: Tensor, w2a: Tensor, tucker: bool) -> int:
    r1, r2 = (int(w1a.shape[0]), int(w2a.shape[0])) if tucker else (int(w1a.shape[1]), int(w2a.shape[1]))
    return (r1 * r1 + r2 * r2 + 8) if tucker else (r1 + r2 + 6)


def lokr_factor_element(full: Tensor | None, a: Tensor | None, b: Tensor | None, t: Tensor | None, position: Sequence[int]) -> Fraction:
    """One element of a Kronecker factor: stored, a @ b, or the Tucker rebuild."""
    if full is not None:
        return dyadic_sum([(full[tuple(position)].item(),)])
    assert a is not None and b is not None
    if t is not None:
        return tucker_element(t, a, b, position[0], position[1], position[2:])
    # a @ b with b's trailing axes flattened, reshaped to (rows, *b.shape[1:]) (``deltas.lokr_factor``).
    column = _flat(position[1:], tuple(b.shape[1:]))
    return product_element(a, _matrix(b), position[0], column)


def _flat(position: Sequence[int], shape: Sequence[int]) -> int:
    index = 0
    for coordinate, size in zip(position, shape):
        index = index * size + coordinate
    return index


def lokr_element(w1: tuple, w2: tuple, w1_shape: Sequence[int], w2_shape: Sequence[int], index: int) -> Fraction:
    """Natural ΔW element of LoKr: kron(w1, w2); each factor given as (full, a, b, t); scale excluded."""
    rows, columns = w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1]
    i, j, *rest = _unravel(index, (rows, columns, *w2_shape[2:]))
    first = lokr_factor_element(*w1, (i // w2_shape[0], j // w2_shape[1]))
    second = lokr_factor_element(*w2, (i % w2_shape[0], j % w2_shape[1], *rest))
    return first * second


def lokr_depth(w1: tuple, w2: tuple) -> int:
    def factor_depth(full, a, b, t) -> int:
        if full is not None:
            return 0
        rank = int(a.shape[0]) if t is not None else int(a.shape[1])
        return rank * rank + 2 if t is not None else rank + 1
    return factor_depth(*w1) + factor_depth(*w2) + 4
