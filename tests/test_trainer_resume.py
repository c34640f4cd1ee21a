"""Resuming by hand on another world size: the global batch decides, not the worker count."""
import pytest
import torch

from tests.test_trainer_support import metric_history, ray_cluster, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_a_zero2_run_of_two_workers_resumes_on_one_when_the_global_batch_is_kept(tmp_path, ray_cluster):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from cluster.driver.launch import launch
    from cluster.driver.resume import plan_resume
    from trainer.checkpoint.manager import load_train_state
    from trainer.checkpoint.store import CheckpointStore
    from trainer.checkpoint.repartition import ZeroCheckpoint

    first = launch(tiny_config(tmp_path, "by-hand", ["train.max_steps=4"]))  # 2 workers x micro-batch 2
    assert first.status == "FINISHED" and first.steps == 4
    store = CheckpointStore(first.checkpoint_dir)
    saved = ZeroCheckpoint(store.step_path(4))
    assert saved.world_size == 2 and saved.optimizer_step == 4

    # one worker alone would halve the global batch: refused, naming the keys that keep it
    with pytest.raises(ValueError, match=r"the global batch was 4 .* now 2 .*set train.grad_accum=2 or "
                                         r"data.batch_size=4 or cluster.num_workers=2"):
        plan_resume(tiny_config(tmp_path, "by-hand", ["cluster.num_workers=1"]), store)

    second = launch(tiny_config(tmp_path, "by-hand", ["train.max_steps=8", "cluster.num_workers=1",
                                                      "train.grad_accum=2"]))
    assert second.status == "FINISHED" and second.steps == 8
    assert second.mlflow_run_id == first.mlflow_run_id  # one MLflow run across the resize
    state = load_train_state(store, 8)
    assert state["world_size"] == 1 and len(state["ranks"]) == 1
    assert state["batch_split"] == {"micro_batch": 2, "world_size": 1, "grad_accum": 2}
    assert state["samples_seen"] == 8 * 4 and state["resizes"] == 1
    resumed = ZeroCheckpoint(store.step_path(8))
    assert resumed.world_size == 1 and resumed.optimizer_step == 8  # AdamW's step count carried on, not reset
    assert any(not torch.equal(saved.full(n), resumed.full(n)) for n in saved.names())
    assert sorted(metric_history(second.tracking_uri, second.mlflow_run_id)) == list(range(1, 9))
    world = metric_history(second.tracking_uri, second.mlflow_run_id, "world_size")
    assert world[1] == [2.0] and world[8] == [1.0]
    assert metric_history(second.tracking_uri, second.mlflow_run_id, "grad_accum")[8] == [2.0]
    tags = MlflowClient(second.tracking_uri).get_run(second.mlflow_run_id).data.tags
    assert tags["resize.1"].startswith("step 4: 2 -> 1 workers (restarted by hand with cluster.num_workers=1)")
    assert tags["world_size"] == "1"
