"""Logging an EvalResult to MLflow at its checkpoint's step: metrics plus the sample grid image."""
from __future__ import annotations

from .spec import EvalResult


def log_eval_result(result: EvalResult, run_id: str, client=None, prefix: str = "eval/") -> None:
    """Metrics (eval/fid, eval/sfid, eval/precision, eval/recall, eval/seconds) at result.step, and
    the grid as `eval/samples/step_XXXXXXXX.png` and as the step-keyed image `eval/samples` (shown over
    steps in the UI's image chart). Works on a finished or a running run."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    step = result.step if result.step is not None else 0
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for key, value in result.metrics(prefix).items()]
    client.log_batch(run_id, metrics=metrics)
    client.log_image(run_id, result.sample_grid, artifact_file=f"{prefix}samples/step_{step:08d}.png")
    client.log_image(run_id, result.sample_grid, key=f"{prefix}samples", step=step)  # the UI's image chart
