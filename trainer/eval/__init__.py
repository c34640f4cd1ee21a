"""FID that never stalls training: standard Inception features, FID / sFID / precision / recall,
and a Ray actor pool that evaluates committed checkpoints beside the training workers.

    inception.py   the FID Inception-v3 (shipped weights) + the TF-era input stage
    metrics.py     Fréchet distance, precision/recall (and why there is no Inception Score)
    reference.py   reference statistics files (ours and the ADM suite's) and the metric bundle
    images.py      image folders / ADM .npz batches, read and written in streams
    spec.py        SamplingSpec (what to sample) and EvalResult (what comes back)
    generation.py  one work unit: seeded samples -> uint8 -> features (shared by pool and local)
    local.py       the single-process evaluation (the pool's reference)
    pool.py        EvalPool: Ray actors, non-blocking submit/poll, fault-tolerant chunks
    tracking.py    logging an EvalResult to MLflow at its checkpoint's step
    hook.py        the driver-side hook: hands each committed checkpoint to the pool, logs results

Imports are lazy so that `import trainer.eval` (e.g. by the CLI) costs nothing.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SamplingSpec": ".spec", "EvalResult": ".spec",
    "EvalPool": ".pool", "EvalFailure": ".pool", "EvalError": ".pool",
    "ReferenceStats": ".reference", "InceptionFeatures": ".inception",
    "frechet_distance": ".metrics", "precision_recall": ".metrics",
    "evaluate_locally": ".local", "log_eval_result": ".tracking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
