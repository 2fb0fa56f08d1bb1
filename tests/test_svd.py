"""ops/svd.py: factored SVD against a dense float64 reference, rank policies, signs, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.ops.svd import (
    RankPolicy,
    canonical_signs,
    clamp_factors,
    dense_svd,
    factored_svd,
    module_seed,
    numerical_rank,
    split_symmetric,
)


def _factors(out, cin, ranks, seed=0, coefficients=None):
    generator = torch.Generator().manual_seed(seed)
    coefficients = coefficients or [1.0] * len(ranks)
    ups = [torch.randn(out, r, generator=generator, dtype=torch.float64) * c for r, c in zip(ranks, coefficients)]
    downs = [torch.randn(r, cin, generator=generator, dtype=torch.float64) for r in ranks]
    return ups, downs


def _reference(matrix, k):
    """Truncated SVD of the materialised matrix, float64, independent of loraforge."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return s, u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


@pytest.mark.parametrize(
    "out, cin, ranks, coefficients",
    [
        (64, 96, [4, 8, 16], [0.8, -0.35, 1.0]),  # linear, mixed ranks, a negative strength
        (32, 16 * 9, [2, 6, 12], [0.5, 0.25, -1.5]),  # 3x3 conv flattened to (out, in*9)
        (24, 200, [16, 16], [1.0, 1.0]),  # R = 32 > out: wide stack, QR of a fat matrix
    ],
)
def test_factored_svd_equals_dense_reference(out, cin, ranks, coefficients):
    ups, downs = _factors(out, cin, ranks, seed=out, coefficients=coefficients)
    matrix = sum(u @ d for u, d in zip(ups, downs))
    k = 8
    result = factored_svd(ups, downs, RankPolicy(rank=k))
    values, truncated = _reference(matrix, k)
    count = result.singular_values.numel()
    torch.testing.assert_close(result.singular_values, values[:count], rtol=1e-6, atol=0.0)
    assert all(float(v) < 1e-10 * float(values[0]) for v in values[count:])
    torch.testing.assert_close(result.up @ result.down, truncated, rtol=0, atol=1e-10 * float(values[0]))
    expected_error = float(torch.linalg.norm(matrix - truncated) / torch.linalg.norm(matrix))
    assert result.relative_error == pytest.approx(expected_error, rel=1e-9)
    assert result.energy_retained == pytest.approx(float((values[:k] ** 2).sum() / (values**2).sum()), rel=1e-12)
    assert result.rank == k


def test_factored_and_dense_paths_give_the_same_factors():
    ups, downs = _factors(48, 80, [4, 12], seed=3, coefficients=[0.7, -0.2])
    matrix = sum(u @ d for u, d in zip(ups, downs))
    factored = factored_svd(ups, downs, RankPolicy(rank=6))
    dense = dense_svd(matrix, RankPolicy(rank=6))
    # Canonical signs make the factors themselves agree, not only their product.
    torch.testing.assert_close(factored.up, dense.up, rtol=0, atol=1e-9)
    torch.testing.assert_close(factored.down, dense.down, rtol=0, atol=1e-9)


def test_resize_to_at_least_true_rank_is_exact():
    ups, downs = _factors(40, 60, [5, 3], seed=4)
    matrix = sum(u @ d for u, d in zip(ups, downs))
    for rank in (8, 20, 64):
        result = factored_svd(ups, downs, RankPolicy(rank=rank))
        assert result.rank == 8  # the true rank; noise singular values are never kept
        torch.testing.assert_close(result.up @ result.down, matrix, rtol=0, atol=1e-12)
        assert result.relative_error == 0.0 and result.energy_retained == 1.0
    dense = dense_svd(matrix, RankPolicy(rank=64))
    assert dense.rank == 8


def test_energy_policy_keeps_the_smallest_rank_reaching_the_fraction():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # squares 16, 9, 4, 1 of 30
    assert RankPolicy(energy=16 / 30).choose(values) == 1
    assert RankPolicy(energy=16 / 30 + 1e-9).choose(values) == 2
    assert RankPolicy(energy=25 / 30).choose(values) == 2
    assert RankPolicy(energy=0.9).choose(values) == 3
    assert RankPolicy(energy=1.0).choose(values) == 4
    assert RankPolicy(energy=1.0, max_rank=2).choose(values) == 2
    # On a real matrix: the chosen k reaches the fraction and k-1 does not.
    ups, downs = _factors(50, 70, [20], seed=5)
    result = factored_svd(ups, downs, RankPolicy(energy=0.9))
    squares = result.singular_values**2
    assert float(squares[: result.rank].sum() / squares.sum()) >= 0.9
    assert float(squares[: result.rank - 1].sum() / squares.sum()) < 0.9


def test_ratio_and_max_policies():
    values = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert RankPolicy(ratio=5.0).choose(values) == 3  # 10/2 = 5 ≤ 5, 10/1 > 5
    assert RankPolicy(ratio=1.0).choose(values) == 1
    assert RankPolicy(ratio=100.0, max_rank=4).choose(values) == 4
    assert RankPolicy(rank=3, max_rank=2).choose(values) == 2
    assert RankPolicy(rank=99).choose(values) == 5
    assert RankPolicy(rank=4).choose(values, numerical_rank=2) == 2


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "energy": 0.5}, {"rank": 0}, {"energy": 1.5}, {"ratio": 0.5}, {"rank": 2, "max_rank": 0}])
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        RankPolicy(**kwargs)


def test_numerical_rank_tolerance():
    values = torch.tensor([1.0, 1e-3, 1e-14], dtype=torch.float64)
    assert numerical_rank(values, (100, 100)) == 2  # 1e-14 < 1·100·2.2e-16 = 2.2e-14
    assert numerical_rank(torch.zeros(3, dtype=torch.float64), (5, 5)) == 0


def test_randomized_svd_is_seeded_and_close_to_optimal():
    generator = torch.Generator().manual_seed(6)
    # A decaying spectrum, like a trained delta.
    u, _ = torch.linalg.qr(torch.randn(120, 60, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(150, 60, generator=generator, dtype=torch.float64))
    spectrum = torch.tensor([0.8**i for i in range(60)], dtype=torch.float64)
    matrix = u @ torch.diag(spectrum) @ v.T
    exact = dense_svd(matrix, RankPolicy(rank=10))
    first = dense_svd(matrix, RankPolicy(rank=10), method="randomized", generator_seed=module_seed(0, "m"))
    again = dense_svd(matrix, RankPolicy(rank=10), method="randomized", generator_seed=module_seed(0, "m"))
    assert torch.equal(first.up, again.up) and torch.equal(first.down, again.down)
    optimal = math.sqrt(float((spectrum[10:] ** 2).sum() / (spectrum**2).sum()))
    assert exact.relative_error == pytest.approx(optimal, rel=1e-9)
    assert optimal <= first.relative_error <= 1.02 * optimal
    measured = float(torch.linalg.norm(matrix - first.up @ first.down) / torch.linalg.norm(matrix))
    assert first.relative_error == pytest.approx(measured, rel=1e-6)


def test_module_seed_is_a_stable_sha256_function():
    assert module_seed(0, "lora_unet_x") == module_seed(0, "lora_unet_x")
    assert module_seed(0, "lora_unet_x") != module_seed(1, "lora_unet_x")
    assert module_seed(0, "lora_unet_x") != module_seed(0, "lora_unet_y")
    assert 0 <= module_seed(2**62, "a") < 2**63
    assert module_seed(0, "lora_unet_x") == 5113594783626118055  # pinned: changes would change outputs


def test_canonical_signs_and_symmetric_split():
    u = torch.tensor([[0.6, -0.8], [-0.8, -0.6]], dtype=torch.float64)
    vh = torch.eye(2, dtype=torch.float64)
    signed_u, signed_vh = canonical_signs(u, vh)
    assert torch.equal(signed_u, torch.tensor([[-0.6, -0.8], [0.8, -0.6]], dtype=torch.float64) * torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(signed_u @ signed_vh, u @ vh)
    up, down = split_symmetric(signed_u, torch.tensor([4.0, 1.0], dtype=torch.float64), signed_vh)
    torch.testing.assert_close(up, signed_u * torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(down, signed_vh * torch.tensor([[2.0], [1.0]], dtype=torch.float64))


def test_clamp_is_off_by_default_and_reported_when_on():
    ups, downs = _factors(64, 64, [8, 8], seed=8)
    matrix = sum(u @ d for u, d in zip(ups, downs))
    plain = factored_svd(ups, downs, RankPolicy(rank=16))
    assert plain.relative_error == 0.0
    clamped = factored_svd(ups, downs, RankPolicy(rank=16), clamp_quantile=0.9)
    measured = float(torch.linalg.norm(matrix - clamped.up @ clamped.down) / torch.linalg.norm(matrix))
    assert clamped.relative_error == pytest.approx(measured, rel=1e-6)
    assert measured > 0.01
    up, down = clamp_factors(torch.arange(10.0).reshape(2, 5), torch.zeros(1, 10), 0.95)
    # 20 values (10 zeros, 0..9): the 19th smallest is 8.
    assert float(up.max()) == 8.0 and float(down.max()) == 0.0
