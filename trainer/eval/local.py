"""Single-process evaluation: the same work units as the pool, run in order in this process.

It is the reference the Ray pool must reproduce, and the path for a quick look without Ray.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .generation import ChunkRunner, class_labels
from .reference import ReferenceStats, Scores, score
from .spec import EvalResult, SamplingSpec, sample_grid

GRID_IMAGES = 16


def score_feature_chunks(chunks: list[tuple[np.ndarray, np.ndarray]], reference: ReferenceStats,
                         fid_method: str = "sqrtm") -> Scores:
    """Scores of per-chunk (pool, spatial) features, given in sample-index order."""
    pool = np.concatenate([c[0] for c in chunks])        # (N, 2048)
    spatial = np.concatenate([c[1] for c in chunks])     # (N, 2023)
    return score(pool, spatial, reference, fid_method)


def evaluate_locally(checkpoint: str | Path, spec: SamplingSpec, reference: ReferenceStats,
                     runner: ChunkRunner | None = None, step: int | None = None,
                     save_npz: str | Path | None = None,
                     on_samples: Callable[[int], None] | None = None, fid_method: str = "sqrtm") -> EvalResult:
    began = time.perf_counter()
    runner = runner or ChunkRunner("cpu")
    features, grid_images, writer = [], [], None
    try:
        for start, stop in spec.chunks():
            keep = save_npz is not None or start < GRID_IMAGES
            out = runner.run(checkpoint, spec, start, stop, keep_images=keep)
            features.append((out.pool, out.spatial))
            if start < GRID_IMAGES:
                grid_images.append(out.images)
            if save_npz is not None:
                if writer is None:
                    from .images import NpzBatchWriter
                    writer = NpzBatchWriter(save_npz, spec.num_samples, *out.images.shape[1:3])
                num_classes = spec.num_classes or runner.model(checkpoint).config.num_classes
                writer.write(start, out.images, class_labels(start, stop, num_classes).numpy())
            if on_samples is not None:
                on_samples(stop - start)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    scores = score_feature_chunks(features, reference, fid_method)
    return EvalResult(step=step, fid=scores.fid, sfid=scores.sfid, precision=scores.precision, recall=scores.recall,
                      num_samples=spec.num_samples, seconds=time.perf_counter() - began,
                      sample_grid=sample_grid(np.concatenate(grid_images), GRID_IMAGES), checkpoint=str(checkpoint))
