"""FID between two image sets, what `dip eval fid` computes: each side is an image folder or an ADM
`.npz` batch (Inception features extracted here) or a statistics `.npz` with mu/sigma (used as is),
and the comparison adds sFID and precision/recall where both sides allow them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.eval.metrics import GaussianStats, frechet_distance, precision_recall


@dataclass
class SetStatistics:
    pool: GaussianStats
    spatial: GaussianStats | None      # sFID statistics; None for a statistics file without mu_s/sigma_s
    features: np.ndarray | None        # pool features for precision/recall; None for a statistics file
    images: int | None = None          # images read (None: precomputed statistics)
    skipped: int = 0                   # unreadable files skipped


def statistics_file(path: str) -> SetStatistics | None:
    """The statistics of a `.npz` holding mu/sigma (and maybe mu_s/sigma_s), else None."""
    if not path.endswith(".npz"):
        return None
    with np.load(path) as data:
        if not {"mu", "sigma"} <= set(data.files):
            return None
        spatial = GaussianStats(data["mu_s"], data["sigma_s"]) if {"mu_s", "sigma_s"} <= set(data.files) else None
        return SetStatistics(GaussianStats(data["mu"], data["sigma"]), spatial, None)


class SetStatisticsReader:
    """Statistics of each side in turn; the Inception network is loaded once, for the first image set."""

    def __init__(self, device: str, batch_size: int, progress):
        self.device, self.batch_size = device, batch_size
        self.progress = progress  # progress(total, desc) -> a context manager with .update(n)
        self._extractor = None

    def read(self, path: str) -> SetStatistics:
        stats = statistics_file(path)
        if stats is not None:
            return stats
        from trainer.eval.images import ImageSet
        from trainer.eval.inception import InceptionFeatures, extract_features

        images = ImageSet(path)
        self._extractor = self._extractor or InceptionFeatures().to(self.device)
        with self.progress(len(images), path) as bar:
            pool, spatial = extract_features(self._extractor, images.batches(self.batch_size), self.device, bar.update)
        return SetStatistics(GaussianStats.of(pool), GaussianStats.of(spatial), pool, len(pool), images.skipped)


@dataclass
class Comparison:
    fid: float
    sfid: float | None = None          # when both sides have spatial statistics
    precision: float | None = None     # of b against a, when both sides have more than 3 feature rows
    recall: float | None = None


def compare_sets(a: SetStatistics, b: SetStatistics, fid_method: str = "sqrtm") -> Comparison:
    sfid = precision = recall = None
    if a.spatial is not None and b.spatial is not None:
        sfid = frechet_distance(a.spatial, b.spatial, method=fid_method)
    if a.features is not None and b.features is not None and min(len(a.features), len(b.features)) > 3:
        precision, recall = precision_recall(a.features, b.features)
    return Comparison(frechet_distance(a.pool, b.pool, method=fid_method), sfid, precision, recall)
