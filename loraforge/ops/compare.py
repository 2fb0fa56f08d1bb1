"""How far apart two versions of one module are: relative Frobenius error, float64.

Pure tensor math, no I/O. ``verify`` uses it to judge an SVD output rebuilt
on another device class against the locked one. For LoRA modules the error
is measured from the factors: with X = [s₁U₁, −s₂U₂] and Y = [D₁; D₂],
s₁U₁D₁ − s₂U₂D₂ = XY, and ‖XY‖_F = ‖R_X R_Yᵀ‖_F where X = Q_X R_X and
Yᵀ = Q_Y R_Y (orthonormal Q's do not change a Frobenius norm). That costs
O((out + in)·R²) instead of O(out·in·R) for the dense product, and unlike
the Gram-matrix shortcut (‖A‖² + ‖B‖² − 2⟨A, B⟩) it does not lose half the
digits to cancellation when the two modules are nearly equal, which is
exactly the case verify measures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dense_relative_error(value: Tensor, reference: Tensor) -> float:
    """‖value − reference‖_F / ‖reference‖_F in float64 (0 when both are zero, inf when only the reference is)."""
    if tuple(value.shape) != tuple(reference.shape):
        raise ValueError(f"shapes differ: {tuple(value.shape)} vs {tuple(reference.shape)}")
    a = value.detach().to(torch.float64)
    b = reference.detach().to(torch.float64)
    return _ratio(float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(b)))


def factored_relative_error(
    up: Tensor, down: Tensor, scale: float, ref_up: Tensor, ref_down: Tensor, ref_scale: float
) -> float:
    """‖s·U·D − s_ref·U_ref·D_ref‖_F / ‖s_ref·U_ref·D_ref‖_F for two LoRA modules of one layer.

    ``up`` is (out, r) or a conv's (out, r, 1, 1); ``down`` is (r, in) or
    (r, in, kh, kw); the two ranks may differ (an energy policy can pick
    another rank on another device).
    """
    u, d = _matrices(up, down)
    ru, rd = _matrices(ref_up, ref_down)
    if u.shape[0] != ru.shape[0] or d.shape[1] != rd.shape[1]:
        raise ValueError(f"the modules adapt different shapes: {tuple(u.shape[:1]) + tuple(d.shape[1:])} "
                         f"vs {tuple(ru.shape[:1]) + tuple(rd.shape[1:])}")
    difference = product_norm(torch.cat([u * scale, ru * -ref_scale], dim=1), torch.cat([d, rd], dim=0))
    return _ratio(difference, product_norm(ru * ref_scale, rd))


def product_norm(left: Tensor, right: Tensor) -> float:
    """‖left @ right‖_F (float64), without forming the product where that is cheaper."""
    rows, inner = left.shape
    cols = right.shape[1]
    if inner == 0:
        return 0.0
    if rows * cols <= (rows + cols) * inner:  # the product is small: just form it
        return float(torch.linalg.matrix_norm(left @ right))
    r_left = torch.linalg.qr(left, mode="r").R  # (min(rows, inner), inner)
    r_right = torch.linalg.qr(right.T, mode="r").R  # (min(cols, inner), inner)
    return float(torch.linalg.matrix_norm(r_left @ r_right.T))


def _matrices(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor]:
    rank = int(down.shape[0])
    u = up.detach().to(torch.float64).reshape(up.shape[0], rank)
    d = down.detach().to(torch.float64).reshape(rank, math.prod(down.shape[1:]))
    return u, d


def _ratio(difference: float, reference: float) -> float:
    if reference == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / reference
