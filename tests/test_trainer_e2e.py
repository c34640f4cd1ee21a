"""End to end on a real local Ray cluster: 2 workers x DeepSpeed ZeRO-2 (CPU, gloo) x MLflow sqlite."""
import json
import os

import pytest
import torch

from tests.test_trainer_support import metric_history, ray_cluster, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_a_tiny_run_writes_everything_it_promises(tmp_path, ray_cluster, capfd, mlflow_reads_from):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from cluster.driver.launch import launch
    from cluster.driver.resume import plan_resume
    from trainer.checkpoint.store import CheckpointStore
    from trainer.export import export
    from trainer.model_io import load_sampling_model

    cfg = tiny_config(tmp_path, "e2e", ["train.max_steps=8", "checkpoint.keep=1", "checkpoint.async_save=true",
                                        "samples.every_steps=4", "tracking.system_metrics_interval_s=1",
                                        "tracking.log_model=true", "tracking.register_model=dip-e2e"])
    summary = launch(cfg)
    assert summary.status == "FINISHED" and summary.steps == 8
    # stdout is not a terminal here (as in a log file or a Ray job): status lines, no progress bar redraws
    output = capfd.readouterr()
    assert "step 8/8 | loss" in output.out + output.err
    assert "training:" not in output.out + output.err and "\r" not in output.err

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

    check_mlflow_extras(cfg, summary, client, run, step_dir, tmp_path, mlflow_reads_from)

    # dip export: EMA state dict identical to ema.pt
    out = tmp_path / "model.pt"
    export(summary.checkpoint_dir, str(out))
    exported = torch.load(out, weights_only=True)
    assert all(torch.equal(exported["state_dict"][k], ema["state_dict"][k]) for k in ema["state_dict"])

    # a re-run with an incompatible config is refused before any worker starts
    with pytest.raises(ValueError, match="model shape differs: hidden_size was 64, now 384"):
        plan_resume(tiny_config(tmp_path, "e2e", ["model.name=DiP-S/16"]), store)
    with pytest.raises(ValueError, match="the global batch was 4 .* now 2 .*set train.grad_accum=2"):
        plan_resume(tiny_config(tmp_path, "e2e", ["cluster.num_workers=1"]), store)
    with pytest.raises(FileExistsError, match="checkpoint.resume=never"):
        plan_resume(tiny_config(tmp_path, "e2e", ["checkpoint.resume=never"]), store)
    plan = plan_resume(tiny_config(tmp_path, "e2e", ["train.max_steps=20"]), store)
    assert plan.step == 8 and plan.mlflow_run_id == summary.mlflow_run_id


def check_mlflow_extras(cfg, summary, client, run, step_dir, tmp_path, mlflow_reads_from):
    """What MLflow users expect of the run, read back through MLflow's client: live MFU figures, grids as
    step-keyed images, system metrics, and the final EMA model as a registered, loadable LoggedModel."""
    import mlflow
    import numpy as np
    from PIL import Image

    from cluster.cli.main import main
    from trainer.sampling import sample_pixels
    from trainer.loop.step_metrics import flops_per_image

    run_id, uri = summary.mlflow_run_id, summary.tracking_uri
    # live MFU: achieved TFLOP/s per device = the run's counted FLOPs x its measured images/s / 2 workers;
    # no MFU on a CPU (no peak): absent, not zero
    flops = flops_per_image(cfg)
    assert float(run.data.tags["training_flops_per_image"]) == flops and run.data.tags["device_name"] == "cpu"
    images_per_s = {s: v[0] for s, v in metric_history(uri, run_id, "images_per_s").items()}
    achieved = {s: v[0] for s, v in metric_history(uri, run_id, "tflops_per_s").items()}
    assert sorted(achieved) == list(range(1, 9))
    for step, value in achieved.items():
        assert value == pytest.approx(images_per_s[step] * flops / 2 / 1e12, rel=1e-9), step
    assert "mfu" not in run.data.metrics and "mfu_practical" not in run.data.metrics

    # sample grids: step-keyed images at their steps (the grid at 8 and the final grid: one image), PNGs kept
    images = [a.path.split("/", 1)[1] for a in client.list_artifacts(run_id, "images")]
    png_steps = sorted(int(name.split("+")[2]) for name in images
                       if name.startswith("samples+step+") and not name.endswith(".webp"))
    assert png_steps == [4, 8]
    assert {"samples/step-4.png", "samples/step-8.png", "samples/final.png"} <= \
        {a.path for a in client.list_artifacts(run_id, "samples")}

    # MLflow's system metrics, sampled on the (single) node while training: no node id in the names
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/{name}" in run.data.metrics, sorted(run.data.metrics)

    # the final EMA model: one LoggedModel of this run, with its checkpoint and config hash, registered
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(models) == 1
    model = models[0]
    assert model.source_run_id == run_id and model.name == "e2e-ema"
    assert model.tags["dip.checkpoint"] == step_dir and model.tags["dip.step"] == "8"
    assert model.tags["dip.config_hash"] == run.data.tags["config_hash"] and model.tags["dip.weights"] == "copy"
    assert [(o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs] == [(model.model_id, 8)]
    version = client.get_model_version("dip-e2e", "1")
    assert version.source == f"models:/{model.model_id}" and version.run_id == run_id

    # loadable with mlflow.pytorch.load_model, and it samples the very images `dip sample` draws from ema.pt
    mlflow_reads_from(uri)
    loaded = mlflow.pytorch.load_model("models:/dip-e2e/1")
    ours = sample_pixels(loaded, [0, 1, 2, 3], 16, seed=3, steps=2).numpy()
    out = tmp_path / "dip-sample.png"
    assert main(["sample", "--checkpoint", step_dir, "--labels", "0,1,2,3", "--seed", "3", "--steps", "2",
                 "--resolution", "16", "--device", "cpu", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))  # 2 x 2 tiles of 16 px
    tiles = [grid[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] for r in range(2) for c in range(2)]
    assert all(np.array_equal(tile, image) for tile, image in zip(tiles, ours))


def test_a_shard_truncated_mid_run_costs_its_samples_not_the_run(tmp_path, ray_cluster, monkeypatch):  # noqa: F811
    """Every shard but one is truncated once step-4 is committed: the run finishes, the unreadable
    samples are skipped and counted (the corrupt_samples metric), no worker fails."""
    import threading
    import time

    from cluster.cli.main import main as dip
    from cluster.driver.launch import launch
    from cluster.driver.prepare import run_paths
    from trainer.checkpoint.store import CheckpointStore

    shards = tmp_path / "shards"
    assert dip(["data", "shard", "--src", "synthetic", "--num-images", "48", "--classes", "4", "--resolution", "16",
                "--format", "mds", "--shard-size", "2KB", "--out", str(shards), "--no-progress"]) == 0
    names = [s["name"] for s in json.loads((shards / "manifest.json").read_text())["shards"]["mds"]]
    assert len(names) >= 3
    monkeypatch.setenv("DIP_FAULT_STEP_SLEEP_S", "0.3")  # steps 5-10 read after the truncation
    cfg = tiny_config(tmp_path, "damaged", [f"data.path={shards}", "train.max_steps=10", "cluster.max_failures=0"])
    truncated = []

    def truncate_after_step_4() -> None:
        store = CheckpointStore(run_paths(cfg).checkpoint_uri)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not store.verify(4).ok:
            time.sleep(0.05)
        for name in names[:-1]:
            os.truncate(shards / "mds" / name, 100)
            truncated.append(name)

    watcher = threading.Thread(target=truncate_after_step_4, daemon=True)
    watcher.start()
    summary = launch(cfg)  # max_failures=0: a worker that failed would fail the run
    watcher.join(timeout=5)
    assert truncated and summary.status == "FINISHED" and summary.steps == 10
    corrupt = metric_history(summary.tracking_uri, summary.mlflow_run_id, "corrupt_samples")
    assert corrupt[4] == [0.0] and corrupt[10][0] > 0, corrupt
