"""An EvalResult lands in a real MLflow sqlite store at its checkpoint's step, with its sample grid."""
from __future__ import annotations

import numpy as np
import pytest

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
    assert _image_steps(client, run_id, "eval~samples") == [100, 200]  # the UI's image chart, over steps


def _image_steps(client, run_id: str, key_in_filename: str) -> list[int]:
    """The steps of the step-keyed images (log_image(key=, step=)) of one key: images/<key>+step+<N>+...png."""
    names = [a.path.split("/", 1)[1] for a in client.list_artifacts(run_id, "images")]
    prefix = key_in_filename + "+step+"
    return sorted(int(n.split("+")[2]) for n in names if n.startswith(prefix) and n.endswith(".png"))


def test_sample_grid_tiles_the_first_images():
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    grid = sample_grid(images, max_images=5)
    assert grid.shape == (4, 6, 3)  # 5 images: 3 columns, 2 rows
    np.testing.assert_array_equal(grid[2:4, 2:4], images[4])
    assert not grid[2:4, 4:6].any()  # the empty cell stays black


class _RecordingPool:
    """Stands in for trainer.eval.pool.EvalPool in a unit test of the hook's hand-over logic only
    (the real pool has its own tests): records calls, finishes a submitted eval when waited on."""

    def __init__(self):
        self.calls, self.running, self.done = [], [], []

    def submit(self, path, step, spec):
        self.calls.append(("submit", step))
        self.running.append(step)

    def wait_idle(self, timeout=None):
        self.calls.append(("wait_idle",))
        self.done += [EvalResult(step=s, fid=100.0 - s / 100, sfid=None, precision=None, recall=None,
                                 num_samples=4, seconds=1.0, sample_grid=np.zeros((2, 2, 3), np.uint8))
                      for s in self.running]
        self.running = []
        return True

    def poll(self):
        done, self.done = self.done, []
        return done

    def in_use(self):
        return set()

    def close(self):
        self.calls.append(("close",))


def _committed_store(tmp_path, steps):
    from trainer.checkpoint.store import CheckpointStore

    store = CheckpointStore(str(tmp_path / "ckpt"))
    for step in steps:
        store.write_stream(f"step-{step}/ema.pt", lambda f: f.write(b"x"))
        store.commit(step, {"ema.pt": 1}, {"world_size": 1})
    return store


def _hook(tmp_path, store, pool):
    from trainer.config import config_from_dict
    from trainer.eval.hook import EvalHook

    cfg = config_from_dict({"run_name": "h", "output_dir": str(tmp_path / "runs"), "eval": {"every_steps": 100}})
    hook = EvalHook(cfg, store)  # eval.enabled is false: no pool is started; the recording one is put in
    hook.pool, hook.spec = pool, None
    return hook


def test_the_last_checkpoint_is_still_evaluated_when_training_ends_between_two_polls(tmp_path):
    store = _committed_store(tmp_path, [100, 200])
    pool = _RecordingPool()
    hook = _hook(tmp_path, store, pool)
    hook.poll(force=True)
    assert pool.calls == [("submit", 200)]  # the newest due one; 100 is stale
    store.write_stream("step-300/ema.pt", lambda f: f.write(b"x"))
    store.commit(300, {"ema.pt": 1}, {"world_size": 1})  # training ends: committed after the last poll
    hook.close(wait_s=60)
    assert pool.calls == [("submit", 200), ("submit", 300), ("wait_idle",), ("close",)]
    assert [r.step for r in hook.results] == [200, 300]


def test_a_failed_run_hands_nothing_more_to_the_pool(tmp_path):
    store = _committed_store(tmp_path, [100])
    pool = _RecordingPool()
    hook = _hook(tmp_path, store, pool)
    hook.close(wait_s=0.0)
    assert pool.calls == [("close",)]


def test_a_synthetic_reference_needs_synthetic_data(tmp_path):
    from trainer.config import config_from_dict
    from trainer.eval.hook import EvalHook

    shards = tmp_path / "shards"
    shards.mkdir()
    cfg = config_from_dict({"run_name": "h", "output_dir": str(tmp_path / "runs"), "data": {"path": str(shards)},
                            "eval": {"enabled": True, "ref_stats": "synthetic"}})
    with pytest.raises(ValueError, match="eval.ref_stats='synthetic' is not valid: a 'synthetic' reference needs "
                                         "data.path: synthetic"):
        EvalHook(cfg, _committed_store(tmp_path, []))


def test_the_training_runs_eval_hook_logs_grids_as_files_and_step_keyed_images(tmp_path):
    from mlflow.tracking import MlflowClient

    from trainer.tracking.run_logger import RunLogger, embedded_uri, open_run

    uri = embedded_uri(str(tmp_path))
    run_id = open_run(uri, "eval-hook", "h", {}, {}, str(tmp_path / "artifacts"))
    tracker = RunLogger(uri, run_id)
    hook = _hook(tmp_path, _committed_store(tmp_path, [100, 200]), _RecordingPool())
    hook.tracker = tracker
    hook.close(wait_s=60)  # the newest due checkpoint (200) is scored and logged
    assert tracker.close(timeout_s=60)
    client = MlflowClient(tracking_uri=uri)
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/eval-step-200.png"]
    assert _image_steps(client, run_id, "eval~samples") == [200]
    assert [m.step for m in client.get_metric_history(run_id, "eval/fid")] == [200]
