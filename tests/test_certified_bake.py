"""Bakes are correctly rounded: RN(exact value), checked with fractions.Fraction next to rounding midpoints.

Each test plants output elements whose exact value lies within 1e-12
(relative) of a float16 or bfloat16 rounding midpoint, some of them behind
cancelling terms of large magnitude so that the float64 sum's accumulation
order decides which side it lands on. The expected bytes are computed here,
independently of loraforge, from the stored numbers with exact rational
arithmetic and round-half-even.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from loraforge.formats.adapters.parse import DeltaCertificate
from loraforge.ops import bake, certified
from loraforge.ops.bake import DenseTerm, LowRankTerm, bake_weight

PRECISION = {torch.float16: (11, -14, 15), torch.bfloat16: (8, -126, 127), torch.float32: (24, -126, 127)}


def reference_round(value: Fraction, dtype: torch.dtype) -> float:
    """Round half to even by brute force: the nearest of the format's numbers around ``value``, ties to the even one.

    torch's conversion only proposes a starting point; the choice is made by
    exact comparisons over its neighbours (independent of loraforge).
    """
    if value == 0:
        return 0.0
    precision, _, emax = PRECISION[dtype]
    largest = Fraction(2) ** emax * (2 - Fraction(2) ** (1 - precision))
    if abs(value) >= largest + Fraction(2) ** (emax - precision):  # at or past the overflow threshold
        return math.copysign(math.inf, value)
    int_type = torch.int16 if dtype != torch.float32 else torch.int32
    start = torch.tensor(float(value), dtype=torch.float64).to(dtype).view(int_type).to(torch.int64).item()
    candidates = []
    for bits in range(start - 3, start + 4):
        number = torch.tensor(bits, dtype=torch.int64).to(int_type).view(dtype).to(torch.float64).item()
        if math.isfinite(number):
            candidates.append((abs(Fraction(number) - value), bits % 2, number))
    return min(candidates)[2]


def midpoints_near(values: np.ndarray, dtype: torch.dtype) -> list[Fraction]:
    """For each value, a rounding midpoint of ``dtype`` next to it (exact)."""
    lower = torch.from_numpy(values).to(dtype)
    bits = lower.view(torch.int16).to(torch.int32) + 1
    upper = bits.to(torch.int16).view(dtype)
    return [(Fraction(float(a)) + Fraction(float(b))) / 2 for a, b in zip(lower.tolist(), upper.tolist())]


def planted_weight(rows: int, columns: int, dtype: torch.dtype, cancel: bool, seed: int):
    """(weight, low-rank terms, offsets): exact values W + c·s·(up @ down) within 1e-12 of midpoints.

    Factors are float32 (what trainers store), so the planted remainder is
    split into a float32 head and tail. With ``cancel``, two rank components
    of size 2^40 that cancel exactly are added in front: a float64 sum that
    meets them first loses the tail.
    """
    rng = np.random.default_rng(seed)
    weight = torch.from_numpy(rng.uniform(0.05, 0.9, (rows, columns)) * rng.choice([-1, 1], (rows, columns))).to(torch.float16)
    coefficient, scale = 0.8, 0.25  # strength 0.8, alpha/rank = 4/16
    multiplier = Fraction(coefficient) * Fraction(scale)
    base = weight.to(torch.float64).numpy()
    targets = midpoints_near(base.reshape(-1) + rng.uniform(0.001, 0.01, base.size), dtype)
    offsets = rng.choice([-1e-12, 0.0, 1e-12, -3e-13, 5e-13], base.size)
    head = np.zeros((rows, columns), dtype=np.float32)
    tail = np.zeros((rows, columns), dtype=np.float32)
    for flat, (mid, offset) in enumerate(zip(targets, offsets)):
        i, j = divmod(flat, columns)
        wanted = (mid * (1 + Fraction(offset)) - Fraction(float(base[i, j]))) / multiplier
        head[i, j] = np.float32(float(wanted))
        tail[i, j] = np.float32(float(wanted - Fraction(float(head[i, j]))))
    # up = [I, I] picks row i of each down block; rank 2·rows.
    up = np.concatenate([np.eye(rows), np.eye(rows)], axis=1).astype(np.float32)
    down = np.concatenate([head, tail], axis=0)
    if cancel:
        big = np.float32(2.0**20)
        up = np.concatenate([np.full((rows, 2), big, np.float32), up], axis=1)
        down = np.concatenate([np.full((1, columns), big, np.float32), np.full((1, columns), -big, np.float32), down], axis=0)
    term = LowRankTerm(torch.from_numpy(up).double(), torch.from_numpy(down).double(), None, coefficient, scale)
    return weight, [term]


def expected_bake(weight: torch.Tensor, terms, dtype: torch.dtype) -> torch.Tensor:
    """RN(W + Σ c·s·up@down) element by element, from the stored numbers, with Fractions."""
    rows, columns = weight.shape
    out = []
    for i in range(rows):
        for j in range(columns):
            total = Fraction(weight[i, j].item())
            for term in terms:
                products = sum(Fraction(u) * Fraction(d) for u, d in zip(term.up[i].tolist(), term.down[:, j].tolist()))
                total += Fraction(term.coefficient) * Fraction(term.scale) * products
            out.append(reference_round(total, dtype))
    return torch.tensor(out, dtype=torch.float64).to(dtype).reshape(rows, columns)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("blocks", [True, False])
def test_planted_midpoints_round_exactly(monkeypatch, dtype, cancel, blocks):
    weight, terms = planted_weight(24, 40, dtype, cancel, seed=3)
    exact_calls = []
    original = certified.exact_round
    monkeypatch.setattr(bake, "exact_round", lambda value, d: exact_calls.append(1) or original(value, d))
    if not blocks:
        monkeypatch.setattr(bake, "_blockable", lambda *args: False)
    ours = bake_weight(weight, terms, dtype)
    expected = expected_bake(weight, terms, dtype)
    assert torch.equal(ours.view(torch.int16), expected.view(torch.int16))
    if cancel:  # every element's bound covers a midpoint: all were decided exactly
        assert len(exact_calls) == weight.numel()
    else:  # 1e-12 is far beyond float64's error here: the bound decides them, exactly right
        assert len(exact_calls) < weight.numel() // 4


def test_accumulation_order_cannot_move_a_planted_element():
    """The float64 sum differs with the order of the rank components; the rounded bytes do not."""
    weight, terms = planted_weight(16, 24, torch.float16, cancel=True, seed=5)
    term = terms[0]
    flipped = LowRankTerm(term.up.flip(1), term.down.flip(0), None, term.coefficient, term.scale)
    sums = [(weight.double() + (t.scaled_up @ t.down)) for t in (term, flipped)]
    assert not torch.equal(sums[0], sums[1])  # the float64 approximations do differ
    assert torch.equal(bake_weight(weight, [term], torch.float16).view(torch.int16),
                       bake_weight(weight, [flipped], torch.float16).view(torch.int16))


def test_dense_terms_are_certified_with_their_envelope():
    """A LoHa-like dense term with a loose float64 evaluation still gives RN(exact)."""
    rng = np.random.default_rng(7)
    rows, columns, rank = 12, 20, 4
    weight = torch.from_numpy(rng.uniform(-1, 1, (rows, columns))).to(torch.float16)
    a = torch.from_numpy(rng.standard_normal((rows, rank)).astype(np.float32)).double()
    b = torch.from_numpy(rng.standard_normal((rank, columns)).astype(np.float32)).double()
    c = torch.from_numpy(rng.standard_normal((rows, rank)).astype(np.float32)).double()
    d = torch.from_numpy(rng.standard_normal((rank, columns)).astype(np.float32)).double()
    exact = [[sum(Fraction(x) * Fraction(y) for x, y in zip(a[i].tolist(), b[:, j].tolist()))
              * sum(Fraction(x) * Fraction(y) for x, y in zip(c[i].tolist(), d[:, j].tolist()))
              for j in range(columns)] for i in range(rows)]
    # Deliberately perturb the float64 evaluation by 1e-14 relative: within the envelope bound it must not matter.
    delta = (a @ b) * (c @ d) * (1 + 1e-14)
    envelope = (a.abs() @ b.abs()) * (c.abs() @ d.abs())
    certificate = DeltaCertificate(envelope, 400, lambda index: exact[index // columns][index % columns])
    term = DenseTerm(0.7, delta, None, certificate.envelope, certificate.depth, certificate.exact)
    ours = bake_weight(weight, [term], torch.float16)
    expected = torch.tensor([[reference_round(Fraction(weight[i, j].item()) + Fraction(0.7) * exact[i][j], torch.float16)
                              for j in range(columns)] for i in range(rows)], dtype=torch.float64).to(torch.float16)
    assert torch.equal(ours.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_round_matches_the_brute_force_reference(dtype):
    rng = np.random.default_rng(11)
    values = [Fraction(float(v)) for v in rng.standard_normal(300) * np.exp(rng.uniform(-30, 12, 300))]
    precision = PRECISION[dtype][0]
    values += [Fraction(1) + Fraction(1, 2**precision), Fraction(3) / 2**(precision + 1) + 1, Fraction(65520), Fraction(65519),
               Fraction(1, 2**25), Fraction(-3, 2**26), Fraction(1, 3), Fraction(-7, 10**9)]
    for value in values:
        assert certified.exact_round(value, dtype) == reference_round(value, dtype) or (
            math.isinf(reference_round(value, dtype)) and math.isinf(certified.exact_round(value, dtype))
        ), value


def test_zeros_keep_the_base_sign_only_when_nothing_touched_them():
    weight = torch.tensor([[-0.0, 0.0, 0.5, -0.0]], dtype=torch.float16)
    up = torch.ones(1, 1, dtype=torch.float64)
    down = torch.tensor([[0.0, 0.0, -0.5, 0.0]], dtype=torch.float64)
    for blocks in (True, False):
        original = bake._blockable
        bake._blockable = (lambda *args: False) if not blocks else original
        try:
            out = bake_weight(weight, [LowRankTerm(up, down, None, 2.0, 0.5)], torch.float16)
        finally:
            bake._blockable = original
        # -0 + 0·… keeps -0; 0.5 - 0.5 cancels to +0 (IEEE's x + (-x)).
        assert out.view(torch.int16).tolist() == [[-32768, 0, 0, -32768]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_concat_factors_are_correctly_rounded(monkeypatch, dtype):
    """concat writes RN(coefficient·scale·u) and RN(Σ mid·down) from the exact products."""
    from loraforge.ops.merge import FactorSource, ModuleTerms, concat_rounded

    exact_calls = []
    original = certified.exact_round
    monkeypatch.setattr(certified, "exact_round", lambda value, d: exact_calls.append(1) or original(value, d))

    rng = np.random.default_rng(13)
    coefficient, scale = 0.7, 0.3  # neither is a dyadic number: c·s·u is rarely exact in float64
    multiplier = Fraction(coefficient) * Fraction(scale)
    # up elements (stored as F64) planted next to midpoints: u = fl64(midpoint·(1+ε)/(c·s)); with ε = 0 the
    # exact product lies within float64's own error of the midpoint and must be decided exactly.
    mids = midpoints_near(rng.uniform(0.01, 1.0, 4000) * rng.choice([-1, 1], 4000), dtype)
    offsets = rng.choice([-1e-12, 1e-12, 0.0], len(mids))
    up = torch.tensor([float(m * (1 + Fraction(o)) / multiplier) for m, o in zip(mids, offsets)],
                      dtype=torch.float64).reshape(400, 10)
    mid = torch.from_numpy(rng.standard_normal((10, 6, 3, 3)).astype(np.float32)).double()
    down = torch.from_numpy(rng.standard_normal((6, 5, 1, 1)).astype(np.float32)).double()
    terms = ModuleTerms((up * (coefficient * scale),), (torch.zeros(10, 45),), None,
                        (FactorSource(up, down, mid, coefficient, scale),))
    out_up, out_down = concat_rounded(terms, dtype)
    expected_up = [reference_round(multiplier * Fraction(u), dtype) for u in up.reshape(-1).tolist()]
    assert out_up.reshape(-1).to(torch.float64).tolist() == expected_up
    assert len(exact_calls) > 100  # the ε = 0 third went through the exact path
    down2 = down.reshape(6, 5)
    expected_down = [reference_round(sum(Fraction(mid[i, j, h, w].item()) * Fraction(down2[j, c].item()) for j in range(6)), dtype)
                     for i in range(10) for c in range(5) for h in range(3) for w in range(3)]
    assert out_down.reshape(-1).to(torch.float64).tolist() == expected_down


def test_dora_terms_are_a_fixed_sequence_of_ieee_operations():
    """DoRA's ΔW and norm are defined operation by operation: pure-Python floats (IEEE doubles) give the same bits."""
    from loraforge.ops import deltas

    rng = np.random.default_rng(17)
    out, cin, rank, scale = 4, 6, 3, 0.5
    up = rng.standard_normal((out, rank)).astype(np.float32).astype(np.float64)
    down = rng.standard_normal((rank, cin)).astype(np.float32).astype(np.float64)
    weight = rng.standard_normal((out, cin)).astype(np.float16).astype(np.float64)
    magnitude = np.abs(rng.standard_normal((out, 1))).astype(np.float32).astype(np.float64)
    ours = deltas.dora_effective_delta(
        torch.from_numpy(weight),
        deltas.lora_delta(torch.from_numpy(up), torch.from_numpy(down), scale=scale, fixed_order=True),
        torch.from_numpy(magnitude),
    )
    expected = []
    for o in range(out):
        directed = []
        for c in range(cin):
            acc = float(up[o, 0]) * float(down[0, c])
            for k in range(1, rank):
                acc = acc + float(up[o, k]) * float(down[k, c])
            directed.append(float(weight[o, c]) + acc * scale)
        squares = [d * d for d in directed] + [0.0, 0.0]  # padded to 8
        while len(squares) > 1:
            half = len(squares) // 2
            squares = [squares[i] + squares[i + half] for i in range(half)]
        factor = float(magnitude[o, 0]) / (math.sqrt(squares[0]) + deltas.DORA_NORM_EPS)
        expected.append([d * factor - float(weight[o, c]) for c, d in enumerate(directed)])
    assert ours.tolist() == expected


@pytest.mark.parametrize("blocks", [True, False])
def test_non_finite_base_elements_stay_as_ieee_gives_them(monkeypatch, blocks):
    """A base holding inf or NaN cannot be rounded exactly; the bake keeps IEEE's inf/NaN and finishes."""
    if not blocks:
        monkeypatch.setattr(bake, "_blockable", lambda *args: False)
    weight = torch.tensor([[float("inf"), float("nan"), -float("inf"), 0.5]], dtype=torch.float16)
    term = LowRankTerm(torch.ones(1, 1, dtype=torch.float64), torch.tensor([[1.0, 1.0, 1.0, 0.25]], dtype=torch.float64), None, 0.5, 1.0)
    out = bake_weight(weight, [term], torch.float16).reshape(-1).tolist()
    assert out[0] == math.inf and math.isnan(out[1]) and out[2] == -math.inf and out[3] == 0.625


from hypothesis import given, settings, strategies as st  # noqa: E402

_SCALES = st.sampled_from([2.0**-30, 2.0**-20, 2.0**-12, 2.0**-6, 1.0, 2.0**6, 2.0**12])


@st.composite
def _bake_case(draw):
    rows, width, rank = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    def matrix(shape, scale):
        values = draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=math.prod(shape), max_size=math.prod(shape)))
        return torch.tensor(values, dtype=torch.float64).reshape(shape) * scale
    weight = matrix((rows, width), draw(_SCALES)).to(torch.float16)
    up, down = matrix((rows, rank), draw(_SCALES)), matrix((rank, width), draw(_SCALES))
    coefficient = draw(st.sampled_from([1.0, 0.8, -0.3, 1 / 3, 1e-3]))
    scale = draw(st.sampled_from([1.0, 0.5, 4 / 3]))
    return weight, LowRankTerm(up, down, None, coefficient, scale), dtype


@settings(max_examples=150, deadline=None)
@given(_bake_case(), st.booleans())
def test_any_small_bake_is_the_exact_sum_rounded_once(case, blocks):
    """Random factors over wide exponent ranges (float16 subnormals, cancellation): RN(exact) element by element."""
    weight, term, dtype = case
    original = bake._blockable
    bake._blockable = original if blocks else (lambda *args: False)
    try:
        ours = bake_weight(weight, [term], dtype)
    finally:
        bake._blockable = original
    for (i, j), value in np.ndenumerate(ours.to(torch.float64).numpy()):
        products = sum(Fraction(u) * Fraction(d) for u, d in zip(term.up[i].tolist(), term.down[:, j].tolist()))
        exact = Fraction(weight[i, j].item()) + Fraction(term.coefficient) * Fraction(term.scale) * products
        expected = reference_round(exact, dtype)
        if exact == 0:
            expected = weight[i, j].item() if products == 0 and weight[i, j].item() == 0 else 0.0
            assert math.copysign(1, value) == math.copysign(1, expected), (i, j)
        assert value == expected or (math.isinf(value) and math.isinf(expected) and value == expected), (i, j, value, expected)
