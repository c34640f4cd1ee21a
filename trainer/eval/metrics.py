"""FID, sFID and improved precision/recall, computed as the ADM evaluation suite computes them.

- Statistics: the mean and the unbiased covariance (np.cov, N - 1) of the features, in float64.
- Fréchet distance: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), with ADM's handling of
  a singular product (add eps to both diagonals) and of a complex sqrtm (drop an imaginary part
  that is numerical noise, fail on a real one). FID uses pool3 features, sFID the spatial ones.
  method="sqrtm" (the default, the standard) runs scipy.linalg.sqrtm on the 2048 x 2048 product: a
  general Schur decomposition, 10-100 s on a small CPU box. method="eigh" computes the same trace as
  sum(sqrt(eig(R S2 R))) with R = sqrt(S1) from a symmetric eigendecomposition; R of the reference is
  computed once and reused, so each eval costs two matmuls and one symmetric eigenvalue problem.
  It is the eval pool's default (training-time curves); offline numbers use "sqrtm".
- Precision / recall (Kynkäänniemi et al. 2019, k = 3): a point lies in a set's manifold when it
  is within the k-th nearest-neighbour distance (self excluded) of some point of that set.
  Precision: samples inside the reference manifold; recall: references inside the sample manifold.
- Inception Score is NOT computed: the FID Inception weights lack the 1008-class logits it needs.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import scipy.linalg
import torch

INCEPTION_SCORE_UNAVAILABLE = ("Inception Score: not computed (the FID Inception weights have no "
                               "1008-class logits layer, so IS cannot be computed correctly from them)")


@dataclasses.dataclass
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64."""
    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0], self.mu.shape[0]):
            raise ValueError(f"GaussianStats: mu must be (D,) and sigma (D, D); got {self.mu.shape} "
                             f"and {self.sigma.shape}")

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need a (N >= 2, D) feature array for a covariance, got shape {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


FID_METHODS = ("sqrtm", "eigh")


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6, method: str = "sqrtm",
                     a_root: np.ndarray | None = None) -> float:
    """Fréchet distance of two Gaussians; `a_root` (= psd_sqrt(a.sigma)) saves its cost with "eigh"."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    if method not in FID_METHODS:
        raise ValueError(f"fid method={method!r}: choose one of {FID_METHODS}")
    diff = a.mu - b.mu
    if method == "eigh":
        trace_covmean = trace_sqrt_product(a.sigma, b.sigma, a_root)
    else:
        trace_covmean = np.trace(_sqrtm_product(a.sigma, b.sigma, eps))
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_covmean)


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (e.g. fewer samples than dimensions): ADM's remedy.
        warnings.warn(f"fid: singular covariance product; adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return covmean


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (eigenvalues below 0 are rounding noise: clipped)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, root1: np.ndarray | None = None) -> float:
    """tr(sqrtm(S1 S2)) = sum sqrt(eig(R S2 R)), R = S1^(1/2): S1 S2 is similar to R S2 R (symmetric PSD)."""
    root1 = psd_sqrt(sigma1) if root1 is None else root1
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def _pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # (n, m) squared euclidean distances, float64: |x|^2 - 2 x.y + |y|^2, clamped at 0.
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ y.T) + (y * y).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 2048) -> np.ndarray:
    """(N,) squared distance from each point to its k-th nearest other point."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float64))
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points, got {x.shape[0]}")
    radii = torch.empty(x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[0], block):
        d = _pairwise_sq_dists(x[start:start + block], x)            # (b, N), self at distance ~0
        radii[start:start + block] = d.kthvalue(k + 1, dim=1).values  # index 0 is the point itself
    return radii.numpy()


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 2048,
                     reference_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall of `samples` against `reference` pool3 features."""
    ref = torch.from_numpy(np.asarray(reference, dtype=np.float64))
    gen = torch.from_numpy(np.asarray(samples, dtype=np.float64))
    if ref.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dimensions differ: {ref.shape[1]} vs {gen.shape[1]}")
    if reference_radii is None:
        reference_radii = manifold_radii(reference, k, block)
    ref_radii = torch.tensor(reference_radii)               # (M,) a copy: the object store's arrays are read-only
    gen_radii = torch.from_numpy(manifold_radii(samples, k, block))  # (N,)
    precise = torch.zeros(gen.shape[0], dtype=torch.bool)   # sample inside some reference ball
    recalled = torch.zeros(ref.shape[0], dtype=torch.bool)  # reference inside some sample ball
    for start in range(0, gen.shape[0], block):
        d = _pairwise_sq_dists(gen[start:start + block], ref)  # (b, M): one pass serves both directions
        precise[start:start + block] = (d <= ref_radii[None, :]).any(dim=1)
        recalled |= (d <= gen_radii[start:start + block, None]).any(dim=0)
    return float(precise.double().mean()), float(recalled.double().mean())
