"""ΔW math of every adapter kind against independent computations.

The references here are written differently from loraforge/ops/deltas.py on
purpose: explicit index loops, convolution of an input through the factor
layers, and tiny cases checked by hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from loraforge.ops import deltas


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# --------------------------------------------------------------------------- scale rules


def test_scale_rules():
    assert deltas.lora_scale(None, 4) == 1.0
    assert deltas.lora_scale(0.0, 4) == 1.0  # LyCORIS: alpha 0 means "no scaling"
    assert deltas.lora_scale(2.0, 8) == 0.25
    assert deltas.lora_scale(16.0, 8) == 2.0
    assert deltas.lokr_scale(4.0, None) == 1.0  # both factors full: alpha ignored
    assert deltas.lokr_scale(4.0, 8) == 0.5


# --------------------------------------------------------------------------- LoRA / LoCon


def test_lora_linear_hand_checked():
    up = torch.tensor([[1.0], [2.0]])
    down = torch.tensor([[3.0, 4.0]])
    delta = deltas.lora_delta(up, down, scale=0.5)
    assert delta.dtype == torch.float64
    assert delta.tolist() == [[1.5, 2.0], [3.0, 4.0]]


def test_lora_linear_matches_index_loop(gen):
    up, down = _rand(gen, 5, 3), _rand(gen, 3, 7)
    delta = deltas.lora_delta(up.float(), down.float(), scale=0.75)
    expected = torch.zeros(5, 7, dtype=torch.float64)
    for o, c, r in itertools.product(range(5), range(7), range(3)):
        expected[o, c] += 0.75 * float(up[o, r].float()) * float(down[r, c].float())
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-12)


def test_lora_conv3x3_equals_composed_convolutions(gen):
    # A LoCon layer is conv(down, k×k) followed by conv(up, 1×1); its ΔW must act identically.
    up, down = _rand(gen, 6, 2, 1, 1), _rand(gen, 2, 4, 3, 3)
    delta = deltas.lora_delta(up, down, scale=1.5)
    assert delta.shape == (6, 4, 3, 3)
    x = _rand(gen, 1, 4, 5, 5)
    composed = F.conv2d(F.conv2d(x, down, padding=1), up) * 1.5
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), composed, rtol=1e-10, atol=1e-10)


def test_locon_tucker_matches_loops_and_convolutions(gen):
    rank = 3
    down, mid, up = _rand(gen, rank, 4, 1, 1), _rand(gen, rank, rank, 3, 3), _rand(gen, 5, rank, 1, 1)
    delta = deltas.lora_delta(up, down, mid=mid, scale=0.5)
    assert delta.shape == (5, 4, 3, 3)
    expected = torch.zeros(5, 4, 3, 3, dtype=torch.float64)
    for o, c, h, w, i, j in itertools.product(range(5), range(4), range(3), range(3), range(rank), range(rank)):
        expected[o, c, h, w] += 0.5 * up[o, i, 0, 0] * mid[i, j, h, w] * down[j, c, 0, 0]
    torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-12)
    x = _rand(gen, 1, 4, 6, 6)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 0.5
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), composed, rtol=1e-10, atol=1e-10)


def test_linear_lora_fits_1x1_conv_target(gen):
    up, down = _rand(gen, 4, 2), _rand(gen, 2, 3)
    delta = deltas.fit_delta(deltas.lora_delta(up, down), (4, 3, 1, 1))
    assert delta.shape == (4, 3, 1, 1)
    torch.testing.assert_close(delta[:, :, 0, 0], up @ down)


# --------------------------------------------------------------------------- LoHa


def test_loha_linear_hand_checked():
    w1a, w1b = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 1.0]])
    w2a, w2b = torch.tensor([[3.0], [1.0]]), torch.tensor([[2.0, 0.0]])
    # (w1a@w1b) = [[1,1],[2,2]], (w2a@w2b) = [[6,0],[2,0]]; ⊙ = [[6,0],[4,0]]; alpha 2 / rank 1 = 2.
    delta = deltas.loha_delta(w1a, w1b, w2a, w2b, scale=2.0)
    assert delta.tolist() == [[12.0, 0.0], [8.0, 0.0]]


def test_loha_flattened_conv_matches_loops(gen):
    rank, out, cin = 2, 3, 2
    w1a, w1b = _rand(gen, out, rank), _rand(gen, rank, cin * 9)
    w2a, w2b = _rand(gen, out, rank), _rand(gen, rank, cin * 9)
    delta = deltas.fit_delta(deltas.loha_delta(w1a, w1b, w2a, w2b, scale=0.25), (out, cin, 3, 3))
    for o, c, h, w in itertools.product(range(out), range(cin), range(3), range(3)):
        column = c * 9 + h * 3 + w
        first = sum(w1a[o, r] * w1b[r, column] for r in range(rank))
        second = sum(w2a[o, r] * w2b[r, column] for r in range(rank))
        assert float(delta[o, c, h, w]) == pytest.approx(0.25 * float(first * second), rel=1e-10, abs=1e-14)


def test_loha_tucker_conv_matches_loops(gen):
    rank, out, cin = 2, 3, 4
    halves = []
    factors = {}
    for half in ("1", "2"):
        t, a, b = _rand(gen, rank, rank, 3, 3), _rand(gen, rank, out), _rand(gen, rank, cin)
        factors[half] = (t, a, b)
        rebuilt = torch.zeros(out, cin, 3, 3, dtype=torch.float64)
        for o, c, h, w, i, j in itertools.product(range(out), range(cin), range(3), range(3), range(rank), range(rank)):
            rebuilt[o, c, h, w] += t[i, j, h, w] * a[i, o] * b[j, c]
        halves.append(rebuilt)
    (t1, w1a, w1b), (t2, w2a, w2b) = factors["1"], factors["2"]
    delta = deltas.loha_delta(w1a, w1b, w2a, w2b, t1=t1, t2=t2, scale=3.0)
    torch.testing.assert_close(delta, 3.0 * halves[0] * halves[1], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- LoKr


def test_lokr_linear_hand_checked():
    w1 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    w2 = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    assert deltas.lokr_delta(w1, w2).tolist() == [[1.0, 2.0], [3.0, 6.0]]


def _kron_by_index(w1, w2):
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:], dtype=torch.float64)
    for i, j, p, q in itertools.product(range(a), range(c), range(b), range(d)):
        out[i * b + p, j * d + q] = w1[i, j] * w2[p, q]
    return out


def test_lokr_factorised_linear_matches_index_formula(gen):
    w1 = _rand(gen, 2, 3)
    w2a, w2b = _rand(gen, 4, 2), _rand(gen, 2, 5)
    w2 = deltas.lokr_factor(None, w2a, w2b)
    delta = deltas.lokr_delta(deltas.lokr_factor(w1, None, None), w2, scale=0.5)
    assert delta.shape == (8, 15)
    torch.testing.assert_close(delta, 0.5 * _kron_by_index(w1, w2a @ w2b), rtol=1e-12, atol=1e-12)


def test_lokr_both_factorised(gen):
    w1a, w1b = _rand(gen, 2, 1), _rand(gen, 1, 3)
    w2a, w2b = _rand(gen, 3, 1), _rand(gen, 1, 2)
    delta = deltas.lokr_delta(deltas.lokr_factor(None, w1a, w1b), deltas.lokr_factor(None, w2a, w2b), scale=2.0)
    torch.testing.assert_close(delta, 2.0 * _kron_by_index(w1a @ w1b, w2a @ w2b), rtol=1e-12, atol=1e-12)


def test_lokr_full_conv_kernel_comes_from_w2(gen):
    w1, w2 = _rand(gen, 2, 2), _rand(gen, 3, 2, 3, 3)
    delta = deltas.lokr_delta(w1, w2)
    assert delta.shape == (6, 4, 3, 3)
    torch.testing.assert_close(delta, _kron_by_index(w1, w2))


def test_lokr_tucker_w2_matches_loops(gen):
    rank = 2
    t2, w2a, w2b = _rand(gen, rank, rank, 3, 3), _rand(gen, rank, 3), _rand(gen, rank, 4)
    w2 = deltas.lokr_factor(None, w2a, w2b, t2)
    expected = torch.zeros(3, 4, 3, 3, dtype=torch.float64)
    for p, q, h, w, i, j in itertools.product(range(3), range(4), range(3), range(3), range(rank), range(rank)):
        expected[p, q, h, w] += t2[i, j, h, w] * w2a[i, p] * w2b[j, q]
    torch.testing.assert_close(w2, expected, rtol=1e-10, atol=1e-12)


def test_lokr_flattened_conv_w2b_equals_4d_layout(gen):
    # LyCORIS writes a non-Tucker conv w2_b either as [r, d·kh·kw] (newer) or [r, d, kh, kw] (older).
    w1, w2a, w2b = _rand(gen, 2, 2), _rand(gen, 3, 2), _rand(gen, 2, 4, 3, 3)
    flat = deltas.lokr_delta(w1, deltas.lokr_factor(None, w2a, w2b.reshape(2, -1)))
    four_d = deltas.lokr_delta(w1, deltas.lokr_factor(None, w2a, w2b))
    assert flat.shape == (6, 72) and four_d.shape == (6, 8, 3, 3)
    torch.testing.assert_close(deltas.fit_delta(flat, (6, 8, 3, 3)), four_d)


# --------------------------------------------------------------------------- diff


def test_diff_is_the_stored_tensor():
    diff = torch.tensor([[0.5, -1.0]], dtype=torch.float16)
    delta = deltas.diff_delta(diff)
    assert delta.dtype == torch.float64 and delta.tolist() == [[0.5, -1.0]]


# --------------------------------------------------------------------------- DoRA


def test_dora_input_axis_hand_checked():
    weight = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    delta = torch.zeros(2, 2)
    # Column norms of W+ΔW are [3, 4]; magnitudes [6, 2] give [[6,0],[0,2]].
    scale = torch.tensor([[6.0, 2.0]])
    effective = deltas.dora_effective_delta(weight, delta, scale, eps=0.0)
    assert effective.tolist() == [[3.0, 0.0], [0.0, -2.0]]


def test_dora_output_axis_hand_checked():
    weight = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    scale = torch.tensor([[1.0], [8.0]])  # row norms [3, 4] -> rows scaled to 1 and 8
    effective = deltas.dora_effective_delta(weight, torch.zeros(2, 2), scale, eps=0.0)
    assert effective.tolist() == [[-2.0, 0.0], [0.0, 4.0]]


def test_dora_conv_input_axis_matches_loops(gen):
    weight, delta = _rand(gen, 3, 2, 3, 3), _rand(gen, 3, 2, 3, 3) * 0.1
    magnitude = _rand(gen, 1, 2, 1, 1).abs() + 0.5
    eps = deltas.DORA_NORM_EPS
    effective = deltas.dora_effective_delta(weight, delta, magnitude)
    merged = weight + delta
    for c in range(2):
        norm = sum(float(merged[o, c, h, w]) ** 2 for o in range(3) for h in range(3) for w in range(3)) ** 0.5
        expected = merged[:, c] * float(magnitude[0, c, 0, 0]) / (norm + eps) - weight[:, c]
        torch.testing.assert_close(effective[:, c], expected, rtol=1e-12, atol=1e-12)


def test_dora_output_axis_peft_vector_matches_loops(gen):
    weight, delta = _rand(gen, 4, 5), _rand(gen, 4, 5) * 0.1
    magnitude = _rand(gen, 4).abs() + 0.5  # PEFT lora_magnitude_vector: [out]
    effective = deltas.dora_effective_delta(weight, delta, magnitude, eps=0.0)
    merged = weight + delta
    for o in range(4):
        norm = float((merged[o] ** 2).sum()) ** 0.5
        torch.testing.assert_close(effective[o], merged[o] * float(magnitude[o]) / norm - weight[o])


def test_dora_at_its_own_norm_is_plain_delta(gen):
    # When dora_scale equals ‖W+ΔW‖ the decomposition changes nothing: W_dora − W = ΔW.
    weight, delta = _rand(gen, 3, 4), _rand(gen, 3, 4)
    magnitude = torch.linalg.vector_norm(weight + delta, dim=0, keepdim=True)
    effective = deltas.dora_effective_delta(weight, delta, magnitude, eps=0.0)
    torch.testing.assert_close(effective, delta, rtol=1e-12, atol=1e-12)


def test_dora_axis_detection_and_rejection():
    assert deltas.dora_norm_axis((8, 4), (1, 4)) == "in"
    assert deltas.dora_norm_axis((8, 4, 3, 3), (1, 4, 1, 1)) == "in"
    assert deltas.dora_norm_axis((8, 4), (8, 1)) == "out"
    assert deltas.dora_norm_axis((8, 4, 3, 3), (8, 1, 1, 1)) == "out"
    assert deltas.dora_norm_axis((8, 4), (8,)) == "out"
    assert deltas.dora_norm_axis((8, 4, 1, 1), (1, 4)) == "in"  # a linear-saved scale on a 1×1 conv
    assert deltas.dora_norm_axis((8, 4), (1, 5)) is None
    assert deltas.dora_norm_axis((8, 4), (4,)) is None
    with pytest.raises(ValueError, match="neither the output nor the input"):
        deltas.dora_effective_delta(torch.ones(8, 4), torch.zeros(8, 4), torch.ones(3))


# --------------------------------------------------------------------------- shapes


def test_implied_shapes():
    assert deltas.lora_delta_shape((8, 4), (4, 16)) == (8, 16)
    assert deltas.lora_delta_shape((8, 4, 1, 1), (4, 16, 3, 3)) == (8, 16, 3, 3)
    assert deltas.lora_delta_shape((8, 4, 1, 1), (4, 16, 1, 1), (4, 4, 3, 3)) == (8, 16, 3, 3)
    assert deltas.loha_delta_shape((8, 4), (4, 144)) == (8, 144)
    assert deltas.loha_delta_shape((4, 8), (4, 16), (4, 4, 3, 3)) == (8, 16, 3, 3)
    assert deltas.lokr_delta_shape((2, 4), (4, 4, 3, 3)) == (8, 16, 3, 3)
    assert deltas.lokr_factor_shape(None, (4, 2), (2, 36)) == (4, 36)
    assert deltas.lokr_factor_shape(None, (2, 4), (2, 4), (2, 2, 3, 3)) == (4, 4, 3, 3)


@pytest.mark.parametrize(
    ("delta", "target", "fits"),
    [
        ((8, 16), (8, 16), True),
        ((8, 16), (8, 16, 1, 1), True),  # linear LoRA on an SD1 1×1 proj_in
        ((8, 16, 1, 1), (8, 16), True),
        ((8, 144), (8, 16, 3, 3), True),  # flattened LoHa/LoKr conv
        ((8, 16, 1, 1), (8, 16, 3, 3), False),
        ((8, 48, 3, 1), (8, 16, 3, 3), False),
        ((8, 16), (16, 8), False),
        ((8, 16), (8, 32), False),
        ((8,), (8, 1), False),
    ],
)
def test_delta_fits(delta, target, fits):
    assert deltas.delta_fits(delta, target) is fits


def test_fit_delta_refuses_wrong_shape():
    with pytest.raises(ValueError, match="does not fit"):
        deltas.fit_delta(torch.zeros(8, 16), (16, 8))


def test_dtype_and_device_follow_inputs(gen):
    up, down = _rand(gen, 4, 2).half(), _rand(gen, 2, 3).half()
    delta64 = deltas.lora_delta(up, down)
    delta32 = deltas.lora_delta(up, down, dtype=torch.float32)
    assert delta64.dtype == torch.float64 and delta32.dtype == torch.float32
    assert delta64.device == up.device
    torch.testing.assert_close(delta64, up.double() @ down.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_deltas_stay_on_device_and_agree_with_cpu(gen):
    up, down, mid = _rand(gen, 6, 3, 1, 1), _rand(gen, 3, 4, 1, 1), _rand(gen, 3, 3, 3, 3)
    w1, w2a, w2b = _rand(gen, 2, 2), _rand(gen, 3, 2), _rand(gen, 2, 4, 3, 3)
    on_cpu = [
        deltas.lora_delta(up, down, mid=mid, scale=0.5),
        deltas.lokr_delta(w1, deltas.lokr_factor(None, w2a, w2b), scale=0.25),
    ]
    on_gpu = [
        deltas.lora_delta(up.cuda(), down.cuda(), mid=mid.cuda(), scale=0.5),
        deltas.lokr_delta(w1.cuda(), deltas.lokr_factor(None, w2a.cuda(), w2b.cuda()), scale=0.25),
    ]
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert gpu.device.type == "cuda"
        # float64 on both devices: agreement far below any save dtype's resolution.
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-14)
