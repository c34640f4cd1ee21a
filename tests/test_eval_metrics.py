"""FID / sFID statistics and improved precision/recall against independent formulas."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from trainer.eval.metrics import GaussianStats, frechet_distance, manifold_radii, precision_recall


def fid_by_eigenvalues(x: np.ndarray, y: np.ndarray) -> float:
    """Independent Fréchet distance: tr(sqrt(S1 S2)) = sum of sqrt(eigenvalues of sqrt(S1) S2 sqrt(S1))."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = (x - mu1).T @ (x - mu1) / (len(x) - 1)
    s2 = (y - mu2).T @ (y - mu2) / (len(y) - 1)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def correlated(rng, n, d, shift=0.0):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def test_stats_are_float64_mean_and_unbiased_covariance():
    x = correlated(np.random.default_rng(0), 50, 6).astype(np.float32)
    stats = GaussianStats.of(x)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / 49, rtol=1e-12)  # N - 1
    with pytest.raises(ValueError, match="N >= 2"):
        GaussianStats.of(x[:1])


@pytest.mark.parametrize("n,d,shift", [(400, 32, 0.3), (3000, 64, 0.0), (500, 16, 2.0)])
def test_frechet_distance_matches_the_eigenvalue_formula(n, d, shift):
    rng = np.random.default_rng(n)
    x, y = correlated(rng, n, d), correlated(rng, n + 17, d, shift)
    ours = frechet_distance(GaussianStats.of(x), GaussianStats.of(y))
    assert ours == pytest.approx(fid_by_eigenvalues(x, y), rel=1e-8, abs=1e-10)
    assert ours == pytest.approx(frechet_distance(GaussianStats.of(y), GaussianStats.of(x)), rel=1e-9)


@pytest.mark.parametrize("n", [20, 600])  # singular (N < D) and full-rank covariances
def test_eigh_method_equals_sqrtm_and_reuses_the_reference_root(n):
    from trainer.eval.metrics import psd_sqrt

    rng = np.random.default_rng(7)
    x, y = correlated(rng, n, 48), correlated(rng, n + 5, 48, 0.4)
    a, b = GaussianStats.of(x), GaussianStats.of(y)
    with np.errstate(all="ignore"):
        standard = frechet_distance(a, b, method="sqrtm")
    fast = frechet_distance(a, b, method="eigh")
    assert fast == pytest.approx(standard, rel=1e-6)
    assert fast == pytest.approx(fid_by_eigenvalues(x, y), rel=1e-9)
    assert frechet_distance(a, b, method="eigh", a_root=psd_sqrt(a.sigma)) == fast
    with pytest.raises(ValueError, match="sqrtm.*eigh"):
        frechet_distance(a, b, method="svd")


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = correlated(np.random.default_rng(1), 300, 24)
    assert abs(frechet_distance(GaussianStats.of(x), GaussianStats.of(x))) < 1e-8


def test_singular_covariances_still_give_the_right_distance():
    # Fewer samples than dimensions: rank-deficient covariances, as with a small FID on 2048-d features.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 40)), rng.normal(size=(25, 40)) + 0.5
    with np.errstate(all="ignore"):
        ours = frechet_distance(GaussianStats.of(x), GaussianStats.of(y))
    assert np.isfinite(ours)
    assert ours == pytest.approx(fid_by_eigenvalues(x, y), rel=1e-4)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(GaussianStats(np.zeros(3), np.eye(3)), GaussianStats(np.zeros(4), np.eye(4)))


def brute_force_precision_recall(ref: np.ndarray, gen: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. written out with scipy distances and full sorts."""
    from scipy.spatial.distance import cdist

    def radii(points):
        d = cdist(points, points)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    r_ref, r_gen = radii(ref), radii(gen)
    d = cdist(gen, ref)  # (n_gen, n_ref)
    precision = np.mean([(d[i] <= r_ref).any() for i in range(len(gen))])
    recall = np.mean([(d[:, j] <= r_gen).any() for j in range(len(ref))])
    return float(precision), float(recall)


def test_precision_recall_match_a_brute_force_computation():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(300, 10))
    gen = rng.normal(size=(250, 10)) * 0.7 + 0.6  # overlapping but different: neither 0 nor 1
    precision, recall = precision_recall(ref, gen, k=3, block=64)
    expected = brute_force_precision_recall(ref, gen)
    assert (precision, recall) == pytest.approx(expected, abs=1e-12)
    assert 0.05 < precision < 0.99 and 0.05 < recall < 0.99


def test_precision_recall_of_a_set_with_itself_is_one():
    x = np.random.default_rng(4).normal(size=(100, 8))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_manifold_radii_exclude_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # k = 1: squared distance to the nearest *other* point.
    np.testing.assert_allclose(manifold_radii(points, k=1), [1.0, 1.0, 4.0, 9.0, 16.0])
    with pytest.raises(ValueError, match="more than 3 points"):
        manifold_radii(points[:3], k=3)


def test_a_complex_sqrtm_with_negligible_imaginary_part_is_accepted():
    # Rank-deficient covariances make sqrtm complex with ~1e-8 imaginary noise: dropped, as ADM does.
    rng = np.random.default_rng(5)
    a, b = correlated(rng, 10, 30), correlated(rng, 12, 30)
    with np.errstate(all="ignore"):
        assert np.iscomplexobj(scipy.linalg.sqrtm(GaussianStats.of(a).sigma @ GaussianStats.of(b).sigma))
        value = frechet_distance(GaussianStats.of(a), GaussianStats.of(b))
    assert value == pytest.approx(fid_by_eigenvalues(a, b), rel=1e-6)


def test_a_large_imaginary_component_is_an_error():
    # Not a covariance (a negative eigenvalue): the square root is genuinely complex.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(GaussianStats(np.zeros(2), np.eye(2)), GaussianStats(np.zeros(2), np.diag([-1.0, 1.0])))
