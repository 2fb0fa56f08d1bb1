"""Dense weight deltas (ΔW) of every supported adapter kind.

Pure tensor math: no I/O, no knowledge of file layouts or key names. Every
function computes in ``dtype`` (float64 by default, so that outputs rounded
once to the save dtype are identical on every device) on the device its factor
tensors already live on.

Conventions follow LyCORIS (``lycoris/modules/{locon,loha,lokr}.py`` and
``lycoris/functional/{locon,loha,lokr,general}.py``) and kohya sd-scripts
(``networks/lora.py``); docs/adapters.md states each one with its source.

A "natural" ΔW is the shape the factors imply. It is either the target's
shape or a flattened form of it (out, in·kh·kw): LoHa and LoKr store 3×3 conv
factors flattened, and SD1 ``proj_in``/``proj_out`` are 1×1 convs that linear
LoRAs target. :func:`fit_delta` reshapes a natural ΔW onto its target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# LyCORIS divides by ``norm + eps`` with eps of the dtype it normalises in,
# which is float32 (the dtype dora_scale is trained and stored in).
DORA_NORM_EPS = float(torch.finfo(torch.float32).eps)

Shape = tuple[int, ...]


# --------------------------------------------------------------------------- scale rules


def lora_scale(alpha: float | None, rank: int) -> float:
    """kohya/LyCORIS LoRA, LoCon and LoHa scale: alpha / rank; no alpha (or 0) means 1."""
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank


def lokr_scale(alpha: float | None, rank: int | None) -> float:
    """LoKr scale: alpha / rank only when a factor is factorised (``rank`` is then known).

    LyCORIS forces alpha = rank when both w1 and w2 are full matrices, so a
    file's alpha is ignored then (``lycoris/modules/lokr.py``).
    """
    if rank is None:
        return 1.0
    return lora_scale(alpha, rank)


# --------------------------------------------------------------------------- shapes


def flat_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(out, in·kh·kw): the matrix view of a linear or conv weight."""
    return (int(shape[0]), math.prod(int(d) for d in shape[1:]))


def delta_fits(delta_shape: Sequence[int], target_shape: Sequence[int]) -> bool:
    """Whether a natural ΔW of ``delta_shape`` can be placed on a weight of ``target_shape``.

    Equal shapes fit. Otherwise the matrix views must agree and at least one
    side must be a matrix or a 1×1 conv: a flattened k×k conv delta (LoHa,
    LoKr) fits its conv, and a linear delta fits a 1×1 conv and vice versa.
    Two conv shapes with different kernels never fit.
    """
    delta_shape, target_shape = tuple(delta_shape), tuple(target_shape)
    if delta_shape == target_shape:
        return True
    if len(delta_shape) < 2 or len(target_shape) < 2:
        return False
    if flat_shape(delta_shape) != flat_shape(target_shape):
        return False
    return not (len(delta_shape) > 2 and len(target_shape) > 2)


def fit_delta(delta: Tensor, target_shape: Sequence[int]) -> Tensor:
    """Reshape a natural ΔW onto its target; raises ValueError when it does not fit."""
    target_shape = tuple(int(d) for d in target_shape)
    if not delta_fits(tuple(delta.shape), target_shape):
        raise ValueError(f"a delta of shape {tuple(delta.shape)} does not fit a weight of shape {target_shape}")
    return delta.reshape(target_shape)


def lora_delta_shape(up_shape: Shape, down_shape: Shape, mid_shape: Shape | None = None) -> Shape:
    """ΔW shape implied by LoRA/LoCon factors (up [out,r(,1,1)], down [r,in(,kh,kw)], mid [r,r,kh,kw])."""
    if mid_shape is not None:
        return (up_shape[0], down_shape[1], *mid_shape[2:])
    return (up_shape[0], *down_shape[1:])


def loha_delta_shape(w1a_shape: Shape, w1b_shape: Shape, t1_shape: Shape | None = None) -> Shape:
    """ΔW shape implied by LoHa factors (plain: w1a [out,r], w1b [r,in…]; Tucker: w1a [r,out], w1b [r,in], t1 [r,r,kh,kw])."""
    if t1_shape is not None:
        return (w1a_shape[1], w1b_shape[1], *t1_shape[2:])
    return (w1a_shape[0], *w1b_shape[1:])


def lokr_factor_shape(
    full: Shape | None, a: Shape | None, b: Shape | None, t: Shape | None = None
) -> Shape:
    """Shape of one Kronecker factor: a full matrix, a @ b, or the Tucker form (a [r,out], b [r,in], t [r,r,k…])."""
    if full is not None:
        return tuple(full)
    assert a is not None and b is not None
    if t is not None:
        return (a[1], b[1], *t[2:])
    return (a[0], *b[1:])


def lokr_delta_shape(w1_shape: Shape, w2_shape: Shape) -> Shape:
    """ΔW shape of kron(w1, w2): w1 [a,c] and w2 [b,d(,k…)] give [a·b, c·d(,k…)]."""
    return (w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1], *w2_shape[2:])


# --------------------------------------------------------------------------- deltas


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype=dtype)


# --------------------------------------------------------------------------- fixed-order arithmetic
#
# A GEMM or a hardware reduction sums in an order that depends on the BLAS,
# its code path, the SIMD width and the device, so its last float64 bits do
# too. Where a non-linear step (DoRA's norm and division) keeps those bits
# from being certified away, ΔW and the norm are evaluated instead as a fixed
# sequence of elementwise IEEE-754 operations (each correctly rounded on every
# CPU and GPU, never fused): the same float64 bits everywhere.


def fixed_order_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b as rank-1 updates in index order (separate multiply, then add): device-independent bits."""
    if a.shape[1] == 0:
        return torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    out = a[:, :1] * b[:1]
    for k in range(1, a.shape[1]):
        out += a[:, k:k + 1] * b[k:k + 1]
    return out


def fixed_order_sum_rows(values: Tensor) -> Tensor:
    """Σ over dim 1 of a (groups, n) tensor by a fixed pairwise tree of elementwise adds."""
    width = values.shape[1]
    size = 1 << max(0, (width - 1).bit_length())
    if size != width:  # zero padding: x + 0 = x
        values = torch.cat([values, values.new_zeros(values.shape[0], size - width)], dim=1)
    while values.shape[1] > 1:
        half = values.shape[1] // 2
        values = values[:, :half] + values[:, half:]
    return values[:, 0]


def _product(a: Tensor, b: Tensor, fixed_order: bool) -> Tensor:
    return fixed_order_matmul(a, b) if fixed_order else a @ b


def lora_delta(
    up: Tensor,
    down: Tensor,
    *,
    scale: float = 1.0,
    mid: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    fixed_order: bool = False,
) -> Tensor:
    """kohya LoRA / LoCon ΔW = scale · up @ down, in the shape the factors imply.

    Conv factors are multiplied as matrices (up.flatten(1) @ down.flatten(1))
    and reshaped to (out, in, kh, kw). With ``mid`` (LoCon Tucker/CP:
    down [r,in,1,1], mid [r,r,kh,kw], up [out,r,1,1]) the delta is
    ΔW[o,c,h,w] = Σ_ij up[o,i] · mid[i,j,h,w] · down[j,c]
    (``lycoris/modules/locon.py``, ``make_weight``).
    """
    up2 = _as(up, dtype).reshape(up.shape[0], -1)
    if mid is not None:
        down2 = _as(down, dtype).reshape(down.shape[0], -1)
        # Contract the rank axes of the core with up (rows) and down (columns).
        core = _as(mid, dtype)
        if fixed_order:  # Σ_i up[o,i]·(Σ_j mid[i,j,h,w]·down[j,c]), inner sum first
            inner = fixed_order_matmul(core.permute(0, 2, 3, 1).reshape(-1, core.shape[1]), down2)
            inner = inner.reshape(core.shape[0], core.shape[2], core.shape[3], -1).permute(0, 3, 1, 2)
            delta = fixed_order_matmul(up2, inner.reshape(core.shape[0], -1)).reshape(up2.shape[0], down2.shape[1], *core.shape[2:])
        else:
            delta = torch.einsum("oi,ijhw,jc->ochw", up2, core, down2)
    else:
        down2 = _as(down, dtype).reshape(down.shape[0], -1)
        delta = _product(up2, down2, fixed_order).reshape(lora_delta_shape(tuple(up.shape), tuple(down.shape)))
    return delta * scale


def _tucker_rebuild(t: Tensor, a: Tensor, b: Tensor, fixed_order: bool = False) -> Tensor:
    """LyCORIS Tucker rebuild: out[p,q,…] = Σ_ij t[i,j,…] · a[i,p] · b[j,q] (``rebuild_tucker``)."""
    if not fixed_order:
        return torch.einsum("ij...,ip,jq->pq...", t, a, b)
    kernel = tuple(t.shape[2:])
    # inner[i,…,q] = Σ_j t[i,j,…]·b[j,q]; then out[p,(…,q)] = Σ_i a[i,p]·inner[i,(…,q)].
    moved = t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1).reshape(-1, t.shape[1])
    inner = fixed_order_matmul(moved, b).reshape(t.shape[0], -1)
    out = fixed_order_matmul(a.transpose(0, 1).contiguous(), inner)
    out = out.reshape(a.shape[1], *(kernel or ()), b.shape[1]) if kernel else out.reshape(a.shape[1], b.shape[1])
    return out.permute(0, out.dim() - 1, *range(1, out.dim() - 1)) if kernel else out


def loha_delta(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    *,
    scale: float = 1.0,
    t1: Tensor | None = None,
    t2: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    fixed_order: bool = False,
) -> Tensor:
    """LoHa ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b) (``lycoris/functional/loha.py``).

    Plain: w?a [out,r], w?b [r,in·kh·kw] (LyCORIS stores conv factors
    flattened; a 4-D w?b is reshaped the same way). Tucker: w?a [r,out],
    w?b [r,in], t? [r,r,kh,kw], each half rebuilt as Σ t·a·b.
    """
    if t1 is not None and t2 is not None:
        half1 = _tucker_rebuild(_as(t1, dtype), _as(w1a, dtype), _as(w1b, dtype), fixed_order)
        half2 = _tucker_rebuild(_as(t2, dtype), _as(w2a, dtype), _as(w2b, dtype), fixed_order)
        return half1 * half2 * scale
    shape = loha_delta_shape(tuple(w1a.shape), tuple(w1b.shape))
    half1 = _product(_as(w1a, dtype), _as(w1b, dtype).reshape(w1b.shape[0], -1), fixed_order)
    half2 = _product(_as(w2a, dtype), _as(w2b, dtype).reshape(w2b.shape[0], -1), fixed_order)
    return (half1 * half2 * scale).reshape(shape)


def lokr_factor(
    full: Tensor | None,
    a: Tensor | None,
    b: Tensor | None,
    t: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    fixed_order: bool = False,
) -> Tensor:
    """One Kronecker factor: the full matrix, a @ b (b may be 4-D, kept as [·,d,k…]), or Tucker Σ t·a·b."""
    if full is not None:
        return _as(full, dtype)
    assert a is not None and b is not None
    if t is not None:
        return _tucker_rebuild(_as(t, dtype), _as(a, dtype), _as(b, dtype), fixed_order)
    product = _product(_as(a, dtype), _as(b, dtype).reshape(b.shape[0], -1), fixed_order)
    return product.reshape(a.shape[0], *b.shape[1:])


def lokr_delta(w1: Tensor, w2: Tensor, *, scale: float = 1.0) -> Tensor:
    """LoKr ΔW = scale · kron(w1, w2) (``lycoris/functional/lokr.py``, ``make_kron``).

    w1 is [a,c]; w2 is [b,d] or a conv factor [b,d,kh,kw], in which case w1 is
    given trailing unit axes so the kernel comes entirely from w2. Build the
    factors with :func:`lokr_factor`; both must already be in the compute dtype.
    """
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1.contiguous(), w2.contiguous()) * scale


def diff_delta(diff: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Full-diff ΔW: the stored difference itself (``.diff``; ``.diff_b`` for the bias)."""
    return _as(diff, dtype)


# --------------------------------------------------------------------------- DoRA


def dora_norm_axis(weight_shape: Sequence[int], scale_shape: Sequence[int]) -> str | None:
    """Which norm a dora_scale of ``scale_shape`` stands for, on a weight of ``weight_shape``.

    "out": one magnitude per output row, norm over all other axes (LyCORIS
    ``wd_on_out=True``, shape [out,1,…]; PEFT ``lora_magnitude_vector``, shape
    [out]). "in": one magnitude per input channel, norm over the output and
    kernel axes (LyCORIS default, shape [1,in,1,…]). None: neither.
    """
    weight_shape, scale_shape = tuple(weight_shape), tuple(scale_shape)
    out, cin = weight_shape[0], (weight_shape[1] if len(weight_shape) > 1 else 1)
    if not scale_shape:
        return None
    # Trailing unit axes are not compared, so a [1,in] scale saved for a linear
    # layer still applies to the same layer stored as a 1×1 conv.
    if scale_shape[0] == out and math.prod(scale_shape[1:]) == 1:
        # A [1,1] scale on a one-row weight reads as "out"; both readings agree then.
        return "out"
    if len(scale_shape) >= 2 and scale_shape[0] == 1 and scale_shape[1] == cin and math.prod(scale_shape[2:]) == 1:
        return "in"
    return None


def dora_effective_delta(
    weight: Tensor,
    delta: Tensor,
    dora_scale: Tensor,
    *,
    eps: float = DORA_NORM_EPS,
    dtype: torch.dtype = torch.float64,
    axis: str | None = None,
) -> Tensor:
    """W_dora − W, where W_dora = (W + ΔW) · dora_scale / (‖W + ΔW‖ + eps).

    The norm follows ``axis`` ("out": per output row, "in": per input
    channel), which the parser decides from the magnitude's shape and
    spelling; without it, the orientation of dora_scale (:func:`dora_norm_axis`).
    ``delta`` must already carry the adapter's scale and have the weight's
    shape. Baking at strength s uses W + s·(W_dora − W), so s = 1 gives the
    DoRA weight and s = 0 the base weight. eps defaults to float32's machine
    epsilon, as LyCORIS does, so a zero column cannot divide by zero.
    """
    if axis is None:
        axis = dora_norm_axis(tuple(weight.shape), tuple(dora_scale.shape))
    if axis is None:
        raise ValueError(
            f"dora_scale of shape {tuple(dora_scale.shape)} fits neither the output nor the input axis "
            f"of a weight of shape {tuple(weight.shape)}"
        )
    base = _as(weight, dtype)
    directed = base + _as(delta, dtype).reshape(base.shape)
    if axis == "out":
        norm_dims = tuple(range(1, directed.dim()))
        magnitude = _as(dora_scale, dtype).reshape(directed.shape[0], *([1] * (directed.dim() - 1)))
    else:
        norm_dims = (0, *range(2, directed.dim()))
        magnitude = _as(dora_scale, dtype).reshape(1, directed.shape[1], *([1] * (directed.dim() - 2)))
    norm = _fixed_order_norm(directed, norm_dims)
    return directed * (magnitude / (norm + eps)) - base


# How a DoRA module's strength s (strength × block weight) enters its weight; docs/adapters.md, "DoRA".
DORA_CONVENTIONS = ("lycoris", "peft")


def dora_increment(
    weight: Tensor,
    delta: Tensor,
    dora_scale: Tensor,
    strength: float,
    *,
    convention: str,
    axis: str,
    eps: float,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """W'(s) − W of a DoRA module baked at strength s under one tool's convention, computed exactly as it does.

    "lycoris" (LyCORIS ``multiplier``, ``_weight_decompose``): W' = (W + ΔW) · (s·(m/(‖W + ΔW‖ + eps) − 1) + 1).
    "peft" (diffusers ``fuse_lora(lora_scale=s)``: PEFT scales ΔW, then merges): W' = m · (W + s·ΔW) / (‖W + s·ΔW‖ + eps).
    Both give W_dora at s = 1. ``delta`` carries the adapter's scale and has the
    weight's shape; ``axis`` is "out" or "in" (the parsed module's dora_axis);
    ``eps`` is the producer's (the file's spelling: LyCORIS float32 eps, PEFT 0).
    The result is the whole increment: add it with coefficient 1. At s = 1 both
    conventions give :func:`dora_effective_delta`'s bits.
    """
    if convention not in DORA_CONVENTIONS:
        raise ValueError(f"unknown DoRA convention {convention!r}; expected one of {DORA_CONVENTIONS}")
    base = _as(weight, dtype)
    scaled = _as(delta, dtype).reshape(base.shape)
    if convention == "peft":
        scaled = scaled * strength
    directed = base + scaled
    if axis == "out":
        norm_dims = tuple(range(1, directed.dim()))
        magnitude = _as(dora_scale, dtype).reshape(directed.shape[0], *([1] * (directed.dim() - 1)))
    elif axis == "in":
        norm_dims = (0, *range(2, directed.dim()))
        magnitude = _as(dora_scale, dtype).reshape(1, directed.shape[1], *([1] * (directed.dim() - 2)))
    else:
        raise ValueError(f"unknown DoRA axis {axis!r}")
    ratio = magnitude / (_fixed_order_norm(directed, norm_dims) + eps)
    if convention == "lycoris" and strength != 1:  # as LyCORIS: at 1 the ratio is used as is
        ratio = (ratio - 1) * strength + 1
    return directed * ratio - base


def _fixed_order_norm(values: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The 2-norm over ``dims`` (keepdim), as elementwise squares, a fixed pairwise tree of adds and sqrt."""
    kept = [d for d in range(values.dim()) if d not in dims]
    moved = values.permute(*kept, *dims)
    groups = math.prod(values.shape[d] for d in kept)
    total = fixed_order_sum_rows((moved * moved).reshape(groups, -1))
    shape = [values.shape[d] if d in kept else 1 for d in range(values.dim())]
    return torch.sqrt(total).reshape(shape)
