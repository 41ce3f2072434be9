"""Tests for sphere_pl.hyperspherical against explicit float64 reference formulas."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sphere_pl.sphere.hyperspherical import (
    hyperspherical_energy,
    normalized_gram,
    principal_directions,
    row_norms,
    sphere_project,
)


def _weight(d_out, d_in, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # a few dominant input directions so the spectrum is far from flat
    scales = torch.logspace(0, -2, d_in, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * scales
    return w.to(dtype)


def _brute_force_energy(weight, s, reduction, normalize=True):
    w = weight.double()
    rows = [w[i] / w[i].norm() if normalize else w[i] for i in range(w.shape[0])]
    total, count = 0.0, 0
    for i in range(len(rows)):
        for j in range(len(rows)):
            if i == j:
                continue
            z = (rows[i] - rows[j]).norm().item()
            total += math.log(1.0 / z) if s == 0 else z ** (-s)
            count += 1
    return total / count if reduction == "mean" else total


def _explicit_directions(weight, eta):
    """C built explicitly in float64, eigh, r by the reference rule."""
    a = weight.double()
    a = a / a.norm(dim=1, keepdim=True)
    c = a.T @ a / a.shape[0]
    values, vectors = torch.linalg.eigh(c)
    values, vectors = values.flip(0), vectors.flip(1)
    r = 0
    cumulative = 0.0
    total = values.sum().item()
    for value in values.tolist():  # r = #{k : cumsum_k / total <= eta} + 1, by hand
        cumulative += value
        if cumulative / total <= eta:
            r += 1
    r += 1
    return vectors[:, :r], r


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_energy_matches_brute_force(s, reduction, chunk_size):
    w = _weight(9, 7, seed=1)
    got = hyperspherical_energy(w, s=s, reduction=reduction, chunk_size=chunk_size)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(_brute_force_energy(w, s, reduction), rel=1e-9)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_energy_of_raw_rows_matches_brute_force(s, chunk_size):
    w = _weight(9, 7, seed=3) * torch.linspace(0.5, 3.0, 9)[:, None]  # rows of different lengths
    got = hyperspherical_energy(w, s=s, chunk_size=chunk_size, normalize_rows=False)
    assert got.item() == pytest.approx(_brute_force_energy(w, s, "mean", normalize=False), rel=1e-9)
    # rescaling one row moves the raw-row energy, never the hyperspherical one
    scaled = w.clone()
    scaled[0] *= 2.0
    assert hyperspherical_energy(scaled, s=s).item() == pytest.approx(hyperspherical_energy(w, s=s).item(), rel=1e-12)
    assert hyperspherical_energy(scaled, s=s, normalize_rows=False).item() != pytest.approx(got.item(), rel=1e-6)


def test_energy_default_is_mean_s1_and_half_weights_work():
    w = _weight(6, 11, seed=2)
    assert hyperspherical_energy(w).item() == pytest.approx(_brute_force_energy(w, 1.0, "mean"), rel=1e-9)
    half = w.half()
    expected = _brute_force_energy(half, 1.0, "mean")  # same half values, evaluated in float64
    assert hyperspherical_energy(half, chunk_size=4).item() == pytest.approx(expected, rel=1e-9)


def test_energy_validation():
    w = _weight(4, 5)
    with pytest.raises(ValueError, match="s must be"):
        hyperspherical_energy(w, s=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        hyperspherical_energy(w, reduction="max")
    w[2] = 0.0
    with pytest.raises(ValueError, match="zero"):
        hyperspherical_energy(w)


def test_energy_coincident_rows_stay_finite():
    w = _weight(5, 4)
    w[3] = w[1] * 2.0  # same direction: distance 0, clamped
    assert torch.isfinite(hyperspherical_energy(w, s=1.0))
    assert torch.isfinite(hyperspherical_energy(w, s=0.0))


def test_row_norms_and_normalized_gram_match_direct_formula():
    w = _weight(10, 13, seed=3)
    w64 = w.double()
    assert torch.allclose(row_norms(w, chunk_size=4), w64.norm(dim=1), rtol=1e-12, atol=0)
    w_hat = w64 / w64.norm(dim=1, keepdim=True)
    gram = normalized_gram(w, chunk_size=4)
    assert gram.dtype == torch.float64 and gram.shape == (10, 10)
    assert torch.allclose(gram, w_hat @ w_hat.T, rtol=0, atol=1e-12)


def test_large_weight_chunked_energy_matches_single_chunk():
    w = _weight(512, 8192, seed=4)
    chunked = hyperspherical_energy(w, chunk_size=256)
    whole = hyperspherical_energy(w, chunk_size=10**6)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)


class _LargestFloat64(TorchFunctionMode):
    """Records the largest float64 tensor produced by any torch call inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel())
        return out


def test_tracker_sees_a_full_float64_copy():
    w = _weight(8, 64)
    with _LargestFloat64() as tracker:
        w.double()
    assert tracker.largest == 8 * 64


def test_no_full_size_float64_intermediate():
    d_out, d_in, chunk = 64, 4096, 256
    w = _weight(d_out, d_in, seed=5)
    with _LargestFloat64() as tracker:
        hyperspherical_energy(w, chunk_size=chunk)
    assert tracker.largest <= max(d_out * d_out, d_out * chunk) < d_out * d_in
    with _LargestFloat64() as tracker:
        u = principal_directions(w, 0.5, chunk_size=chunk)
    assert tracker.largest <= max(d_out * d_out, d_out * chunk, d_in * u.shape[1]) < d_out * d_in


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
@pytest.mark.parametrize("eta", [0.3, 0.5, 0.9])
def test_principal_directions_match_explicit_eigh(shape, eta):
    w = _weight(*shape, seed=6)
    expected, r = _explicit_directions(w, eta)
    u = principal_directions(w, eta, chunk_size=5)
    assert u.shape == (shape[1], r)
    assert u.dtype == torch.float32
    u64 = u.double()
    assert torch.allclose(u64.T @ u64, torch.eye(r, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(u64 @ u64.T, expected @ expected.T, atol=1e-5)


def test_principal_directions_r_is_capped_at_rank():
    # rank-3 rows: eta close to 1 would ask for more directions than exist
    g = torch.Generator().manual_seed(7)
    f64 = torch.float64
    w = torch.randn(8, 3, generator=g, dtype=f64) @ torch.randn(3, 30, generator=g, dtype=f64)
    u = principal_directions(w, 1.0)
    assert u.dtype == torch.float64
    assert u.shape == (30, 3)
    assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_principal_directions_disabled_and_bad_input():
    w = _weight(6, 20)
    assert principal_directions(w, 0.0).shape == (20, 0)
    assert principal_directions(w, -1.0).shape == (20, 0)
    with pytest.raises(ValueError):
        principal_directions(w[0], 0.5)
    w[1] = 0.0
    with pytest.raises(ValueError, match="zero"):
        principal_directions(w, 0.5)
    tall = _weight(20, 6)  # d_in <= d_out path
    tall[3] = 0.0
    with pytest.raises(ValueError, match="zero"):
        principal_directions(tall, 0.5)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
def test_sphere_project_matches_explicit_projector(alpha):
    w = _weight(10, 24, seed=8)
    delta = torch.randn(10, 24, generator=torch.Generator().manual_seed(9))
    u = principal_directions(w, 0.5)
    u64 = u.double()
    projector = torch.eye(24, dtype=torch.float64) - alpha * u64 @ u64.T
    expected = delta.double() @ projector.T
    got = sphere_project(delta, u, alpha)
    assert got.dtype == delta.dtype and got.shape == delta.shape
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_sphere_project_scales_only_the_principal_component():
    alpha = 0.8
    w = _weight(10, 24, seed=10, dtype=torch.float64)
    delta = torch.randn(10, 24, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    u = principal_directions(w, 0.5)
    assert 0 < u.shape[1] < 24
    got = sphere_project(delta, u, alpha)
    assert torch.allclose(got @ u, (1 - alpha) * (delta @ u), atol=1e-12)
    complement = torch.eye(24, dtype=torch.float64) - u @ u.T
    assert torch.allclose(got @ complement, delta @ complement, atol=1e-12)
    assert not torch.allclose(got, delta)


def test_sphere_project_keeps_dtype_and_handles_empty_and_bad_shapes():
    w = _weight(6, 20)
    delta = torch.randn(6, 20).half()
    assert sphere_project(delta, principal_directions(w, 0.5), 0.5).dtype == torch.float16
    unchanged = sphere_project(delta, principal_directions(w, 0.0), 0.5)
    assert torch.equal(unchanged, delta)
    with pytest.raises(ValueError, match="d_in"):
        sphere_project(torch.randn(6, 19), principal_directions(w, 0.5), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        sphere_project(torch.randn(20), principal_directions(w, 0.5), 0.5)
