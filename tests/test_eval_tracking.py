"""An EvalResult lands in a real MLflow sqlite store at its checkpoint's step, with its sample grid."""
from __future__ import annotations

import numpy as np

from trainer.eval.spec import EvalResult, sample_grid


def test_eval_result_is_logged_at_its_step(tmp_path):
    from mlflow.tracking import MlflowClient

    from trainer.eval.tracking import log_eval_result

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    for step, fid in ((100, 80.5), (200, 61.25)):
        log_eval_result(EvalResult(step=step, fid=fid, sfid=None, precision=0.5, recall=0.25, num_samples=5,
                                   seconds=3.0, sample_grid=sample_grid(images)), run_id, client)
    history = client.get_metric_history(run_id, "eval/fid")
    assert [(m.step, m.value) for m in history] == [(100, 80.5), (200, 61.25)]
    assert client.get_metric_history(run_id, "eval/sfid") == []  # unavailable: not logged as a number
    artifacts = [a.path for a in client.list_artifacts(run_id, "eval/samples")]
    assert artifacts == ["eval/samples/step_00000100.png", "eval/samples/step_00000200.png"]


def test_sample_grid_tiles_the_first_images():
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    grid = sample_grid(images, max_images=5)
    assert grid.shape == (4, 6, 3)  # 5 images: 3 columns, 2 rows
    np.testing.assert_array_equal(grid[2:4, 2:4], images[4])
    assert not grid[2:4, 4:6].any()  # the empty cell stays black
