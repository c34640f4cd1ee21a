"""Reference statistics (the "real" side of FID) and the sample-vs-reference metric bundle.

File format (`.npz`), a superset of the ADM suite's reference batches:
  mu, sigma          pool3 mean / covariance (float64)              [ADM]
  mu_s, sigma_s      spatial (sFID) mean / covariance               [ADM]
  arr_0              uint8 (N, H, W, 3) reference images            [ADM; used for precision/recall]
  pool_features      float32 (M, 2048) reference pool3 features     [ours; precision/recall without arr_0]
  num_images         how many images the statistics came from       [ours]
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from .metrics import GaussianStats, frechet_distance, manifold_radii, precision_recall, psd_sqrt

log = logging.getLogger(__name__)

# Precision/recall against 10K reference images, as the ADM suite does with its reference batches.
DEFAULT_PR_REFERENCE_SIZE = 10_000
PR_NEIGHBOURS = 3


@dataclasses.dataclass
class ReferenceStats:
    pool: GaussianStats
    spatial: GaussianStats | None = None
    pool_features: np.ndarray | None = None   # (M, 2048): the reference manifold for precision/recall
    num_images: int = 0

    def __post_init__(self):
        if self.pool_features is not None:
            self.pool_features = np.asarray(self.pool_features, dtype=np.float32)
            if self.pool_features.ndim != 2 or self.pool_features.shape[1] != self.pool.mu.shape[0]:
                raise ValueError(f"ReferenceStats.pool_features must be (M, {self.pool.mu.shape[0]}), "
                                 f"got {self.pool_features.shape}")
        self._radii: np.ndarray | None = None
        self._roots: dict[str, np.ndarray] = {}

    @classmethod
    def from_features(cls, pool: np.ndarray, spatial: np.ndarray | None,
                      keep_features: int = DEFAULT_PR_REFERENCE_SIZE) -> "ReferenceStats":
        return cls(pool=GaussianStats.of(pool), spatial=None if spatial is None else GaussianStats.of(spatial),
                   pool_features=np.asarray(pool[:keep_features], dtype=np.float32), num_images=len(pool))

    def reference_radii(self) -> np.ndarray:
        """k-NN radii of the reference manifold; computed once (the costly half of precision/recall)."""
        if self._radii is None:
            self._radii = manifold_radii(self.pool_features, PR_NEIGHBOURS)
        return self._radii

    def root(self, which: str) -> np.ndarray:
        """psd_sqrt of the pool / spatial covariance, computed once (the reusable half of "eigh" FID)."""
        if which not in self._roots:
            self._roots[which] = psd_sqrt((self.pool if which == "pool" else self.spatial).sigma)
        return self._roots[which]

    def prepare(self, fid_method: str) -> "ReferenceStats":
        """Compute the cached parts now (e.g. once, before the reference is shipped to the eval actors)."""
        if self.pool_features is not None:
            self.reference_radii()
        if fid_method == "eigh":
            self.root("pool")
            if self.spatial is not None:
                self.root("spatial")
        return self

    def save(self, path: str | Path) -> None:
        arrays = {"mu": self.pool.mu, "sigma": self.pool.sigma, "num_images": np.int64(self.num_images)}
        if self.spatial is not None:
            arrays.update(mu_s=self.spatial.mu, sigma_s=self.spatial.sigma)
        if self.pool_features is not None:
            arrays["pool_features"] = self.pool_features
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)  # a crash never leaves a half-written reference file behind

    @classmethod
    def load(cls, path: str | Path, extractor=None, device: str = "cpu") -> "ReferenceStats":
        """Read our file or an ADM reference batch. Without `pool_features`, precision/recall
        uses the features of `arr_0` (computed here, with `extractor` or a fresh InceptionFeatures)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such reference statistics file")
        check_reference_file(path)
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            pool = GaussianStats(data["mu"], data["sigma"])
            spatial = GaussianStats(data["mu_s"], data["sigma_s"]) if {"mu_s", "sigma_s"} <= keys else None
            features = data["pool_features"] if "pool_features" in keys else None
            num_images = int(data["num_images"]) if "num_images" in keys else 0
        if features is None and "arr_0" in keys:
            features = _features_of_reference_images(path, extractor, device)
            num_images = num_images or len(features)
        if spatial is None:
            log.warning("%s has no mu_s/sigma_s: sFID will not be reported", path)
        if features is None:
            log.warning("%s has neither pool_features nor arr_0: precision/recall will not be reported", path)
        return cls(pool=pool, spatial=spatial, pool_features=features, num_images=num_images)


def check_reference_file(path: str | Path) -> None:
    """Cheap validation (reads the member list only): a readable .npz with at least mu and sigma."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npz of reference statistics ({err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, not an .npz of reference statistics (mu, sigma, ...)")
    with data:
        keys = set(data.files)
    if not {"mu", "sigma"} <= keys:
        raise ValueError(f"{path}: reference statistics need 'mu' and 'sigma' (ADM format); it holds {sorted(keys)}")


def _features_of_reference_images(path: Path, extractor, device: str) -> np.ndarray:
    from .images import ImageSet
    from .inception import InceptionFeatures, extract_features

    log.info("computing reference pool3 features from %s:arr_0 for precision/recall", path)
    extractor = extractor if extractor is not None else InceptionFeatures().to(device)
    pool, _ = extract_features(extractor, ImageSet(path).batches(64), device)
    return pool


@dataclasses.dataclass
class Scores:
    fid: float
    sfid: float | None
    precision: float | None
    recall: float | None

    def __str__(self) -> str:
        def fmt(v):
            return "n/a" if v is None else f"{v:.6g}"
        return f"FID {fmt(self.fid)}  sFID {fmt(self.sfid)}  precision {fmt(self.precision)}  recall {fmt(self.recall)}"


def score(pool: np.ndarray, spatial: np.ndarray | None, reference: ReferenceStats,
          fid_method: str = "sqrtm") -> Scores:
    """FID, sFID, precision, recall of sample features against the reference (None where unavailable)."""
    def distance(which: str, features: np.ndarray, stats: GaussianStats) -> float:
        root = reference.root(which) if fid_method == "eigh" else None
        return frechet_distance(stats, GaussianStats.of(features), method=fid_method, a_root=root)

    fid = distance("pool", pool, reference.pool)
    sfid = None
    if spatial is not None and reference.spatial is not None:
        sfid = distance("spatial", spatial, reference.spatial)
    precision = recall = None
    if reference.pool_features is not None:
        if len(pool) > PR_NEIGHBOURS and len(reference.pool_features) > PR_NEIGHBOURS:
            precision, recall = precision_recall(reference.pool_features, pool, PR_NEIGHBOURS,
                                                 reference_radii=reference.reference_radii())
    if not math.isfinite(fid):
        raise ValueError(f"FID is not finite ({fid})")
    return Scores(fid=fid, sfid=sfid, precision=precision, recall=recall)
