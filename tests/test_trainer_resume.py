"""Resuming on another world size: what we support (ZeRO-0) and what we refuse (ZeRO 1-3)."""
import pytest
import torch

from tests.test_trainer_support import metric_history, ray_cluster, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_zero0_checkpoint_of_two_workers_resumes_on_one(tmp_path, ray_cluster):  # noqa: F811
    from cluster.launch import launch, plan_resume
    from trainer.checkpoint import load_train_state
    from trainer.checkpoint_store import CheckpointStore

    first = launch(tiny_config(tmp_path, "elastic", ["train.zero_stage=0", "train.max_steps=4"]))
    assert first.status == "FINISHED" and first.steps == 4
    store = CheckpointStore(first.checkpoint_dir)
    before = torch.load(store.step_path(4) + "/mp_rank_00_model_states.pt", weights_only=True)["module"]

    # ZeRO-2 shards would be refused on one worker; ZeRO-0 holds the whole optimizer in one file
    with pytest.raises(ValueError, match="ZeRO-2 optimizer shards resume only on the same world size"):
        plan_resume(tiny_config(tmp_path, "elastic", ["train.zero_stage=2", "cluster.num_workers=1"]), store)

    second = launch(tiny_config(tmp_path, "elastic", ["train.zero_stage=0", "train.max_steps=8",
                                                      "cluster.num_workers=1"]))
    assert second.status == "FINISHED" and second.steps == 8
    assert second.mlflow_run_id == first.mlflow_run_id
    state = load_train_state(store, 8)
    assert state["world_size"] == 1 and len(state["ranks"]) == 1
    assert state["samples_seen"] == 4 * 2 * 2 + 4 * 1 * 2  # 4 steps of 2 workers, then 4 steps of 1
    after = torch.load(store.step_path(8) + "/mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it kept training from the loaded weights
    losses = metric_history(second.tracking_uri, second.mlflow_run_id)
    assert sorted(losses) == list(range(1, 9))
