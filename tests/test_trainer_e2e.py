"""End to end on a real local Ray cluster: 2 workers x DeepSpeed ZeRO-2 (CPU, gloo) x MLflow sqlite."""
import json
import os

import pytest
import torch

from tests.test_trainer_support import metric_history, ray_cluster, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_a_tiny_run_writes_everything_it_promises(tmp_path, ray_cluster):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from cluster.launch import launch, plan_resume
    from trainer.checkpoint_store import CheckpointStore
    from trainer.commands import export
    from trainer.model_io import load_sampling_model

    cfg = tiny_config(tmp_path, "e2e", ["train.max_steps=8", "checkpoint.keep=1", "checkpoint.async_save=true"])
    summary = launch(cfg)
    assert summary.status == "FINISHED" and summary.steps == 8

    # checkpoints: only the newest (keep=1), committed, with every rank's shard
    store = CheckpointStore(summary.checkpoint_dir)
    assert store.steps() == [8] and store.latest_committed() == 8
    step_dir = store.step_path(8)
    files = set(os.listdir(step_dir))
    assert {"COMMITTED", "ema.pt", "train_state.pt", "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert "latest" not in os.listdir(summary.checkpoint_dir)  # DeepSpeed's file is not our marker

    # ema.pt: the format dip sample loads, with weights_only
    ema = torch.load(os.path.join(step_dir, "ema.pt"), weights_only=True)
    assert ema["model_config"]["hidden_size"] == 64 and ema["model_config"]["num_classes"] == 4
    assert load_sampling_model(step_dir).config.num_classes == 4

    # the train state: step, samples, config + hash, MLflow run, each rank's data + RNG state
    state = torch.load(os.path.join(step_dir, "train_state.pt"), weights_only=True)
    assert state["step"] == 8 and state["samples_seen"] == 8 * 2 * 2 and state["world_size"] == 2
    assert state["mlflow_run_id"] == summary.mlflow_run_id and state["config"]["run_name"] == "e2e"
    assert len(state["ranks"]) == 2
    for rank_state in state["ranks"]:
        assert rank_state["data"]["format"] == "mds"
        assert {"python", "numpy", "torch", "cuda"} <= set(rank_state["rng"])
    assert state["batch_split"] == {"micro_batch": 2, "world_size": 2, "grad_accum": 1}
    marker = json.loads(open(os.path.join(step_dir, "COMMITTED")).read())
    assert marker["config_hash"] == state["config_hash"] and marker["world_size"] == 2

    # MLflow: params, tags, every metric family, the artifacts
    client = MlflowClient(tracking_uri=summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.name"] == "DiP-T/16"
    assert run.data.tags["world_size"] == "2" and run.data.tags["device_kind"] == "cpu"
    assert run.data.tags["zero_stage"] == "2" and run.data.tags["git_commit"]
    for key in ("loss", "lr", "grad_norm", "images_per_s", "data_wait_share", "peak_memory_mb", "corrupt_samples"):
        assert key in run.data.metrics, key
    assert sorted(metric_history(summary.tracking_uri, summary.mlflow_run_id)) == list(range(1, 9))
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id)}
    assert {"MODEL_CARD.md", "config", "samples"} <= artifacts
    assert summary.sample_grid and os.path.isfile(summary.sample_grid)

    # dip export: EMA state dict identical to ema.pt
    out = tmp_path / "model.pt"
    export(summary.checkpoint_dir, str(out))
    exported = torch.load(out, weights_only=True)
    assert all(torch.equal(exported["state_dict"][k], ema["state_dict"][k]) for k in ema["state_dict"])

    # a re-run with an incompatible config is refused before any worker starts
    with pytest.raises(ValueError, match="model shape differs: hidden_size was 64, now 384"):
        plan_resume(tiny_config(tmp_path, "e2e", ["model.name=DiP-S/16"]), store)
    with pytest.raises(ValueError, match="cluster.num_workers was 2, now 1"):
        plan_resume(tiny_config(tmp_path, "e2e", ["cluster.num_workers=1"]), store)
    with pytest.raises(FileExistsError, match="checkpoint.resume=never"):
        plan_resume(tiny_config(tmp_path, "e2e", ["checkpoint.resume=never"]), store)
    plan = plan_resume(tiny_config(tmp_path, "e2e", ["train.max_steps=20"]), store)
    assert plan.step == 8 and plan.mlflow_run_id == summary.mlflow_run_id
