"""train.init_from through a real `launch` on a local Ray cluster (1 worker, DeepSpeed ZeRO-2 on CPU).

The session's 16 px ZeRO-2 reference run (2 workers, 12 steps: tests/conftest.py, computed once per
`make test` for the kill tests anyway) warm-starts a 64 px run from its checkpoints directory (DiP's
rotary positions take any resolution at the same patch size); that run's worker is
SIGKILLed after step 6 (trainer/faults.py): Ray's restarted worker group resumes from the run's own
step-4, not from the init, and says so. The source is recorded in MLflow and the model card. The raw
(consolidated ZeRO) weights of the source's step load as init too.
"""
import glob
import json
import os

import pytest
import torch

from tests.test_trainer_support import ray_cluster, tiny_config  # noqa: F401

pytestmark = pytest.mark.slow
ONE_WORKER = ["cluster.num_workers=1", "cluster.num_cpus=2"]


def _ledger_steps(ledger_dir: str) -> dict[str, list[int]]:
    """{attempt: sorted optimizer steps it trained} from the sample ledger (faults.record_samples)."""
    steps: dict[str, set] = {}
    for path in glob.glob(os.path.join(ledger_dir, "ledger-*.jsonl")):
        with open(path) as handle:
            for line in handle:
                entry = json.loads(line)
                steps.setdefault(entry["attempt"], set()).add(entry["step"])
    return {attempt: sorted(found) for attempt, found in steps.items()}


def _worker_logs() -> str:
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    text = []
    for path in glob.glob(os.path.join(logs, "**", "*.out"), recursive=True) + \
            glob.glob(os.path.join(logs, "**", "*.err"), recursive=True):
        with open(path, errors="replace") as handle:
            text.append(handle.read())
    return "\n".join(text)


def test_a_warm_started_64px_run_killed_mid_run_resumes_from_its_own_checkpoint(tmp_path, ray_cluster,  # noqa: F811
                                                                                 zero2_reference, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cluster.driver.launch import launch
    from cluster.driver.prepare import run_paths
    from trainer.checkpoint.init_from import initialise_module
    from trainer.loop.engine import build_objective_module
    from trainer.model_io import consolidated_weights

    source = zero2_reference  # only read: the other tests compare against it
    assert source.status == "FINISHED" and source.steps == 12
    newest = f"{os.path.basename(os.path.dirname(source.checkpoint_dir))}/checkpoints/step-12"

    faults, ledger = tmp_path / "faults", tmp_path / "ledger"
    faults.mkdir()
    ledger.mkdir()
    monkeypatch.setenv("DIP_FAULT_DIR", str(faults))
    monkeypatch.setenv("DIP_FAULT_KILL_AT", "6:0")
    monkeypatch.setenv("DIP_FAULT_SAMPLE_LEDGER", str(ledger))
    cfg = tiny_config(tmp_path, "warm64", [*ONE_WORKER, "data.resolution=64", "train.max_steps=8",
                                           f"train.init_from={source.checkpoint_dir}"])
    lines: list[str] = []
    run = launch(cfg, echo=lines.append)
    assert (faults / "fired-kill-at-6-0").exists(), "the worker was never killed"
    assert run.status == "FINISHED" and run.steps == 8
    assert any("initialising from ema weights of" in line and newest in line for line in lines)
    # attempt 1 trained steps 0..5 from the init; the restarted group resumed at its own step-4
    attempts = sorted(_ledger_steps(str(ledger)).values(), key=lambda steps: steps[0])
    assert [steps[0] for steps in attempts] == [0, 4], attempts
    assert attempts[1] == [4, 5, 6, 7]
    logs = _worker_logs()
    assert "ignored: the run resumes from its own checkpoint" in logs and "warm64/checkpoints/step-4" in logs

    client = MlflowClient(run.tracking_uri)
    record = client.get_run(run.mlflow_run_id).data
    assert record.params["train.init_from"] == source.checkpoint_dir
    assert record.params["init_from.source"].endswith(newest)
    assert record.tags["init_from.parent_run_id"] == source.mlflow_run_id
    with open(os.path.join(run_paths(cfg).run_dir, "MODEL_CARD.md")) as card:
        assert f"- initialised from: {source.checkpoint_dir} (ema weights)" in card.read()

    # the raw weights of the source's step: consolidated from its ZeRO shards
    raw_cfg = tiny_config(tmp_path, "raw64", ["data.resolution=64", "train.init_weights=raw",
                                              f"train.init_from={source.checkpoint_dir}/step-12"])
    module = build_objective_module(raw_cfg)
    assert initialise_module(module, raw_cfg, str(tmp_path / "none"), rank=0).weights == "raw"
    raw = consolidated_weights(os.path.join(source.checkpoint_dir, "step-12"))  # from its 2 ranks' ZeRO shards
    for key, value in module.denoiser.state_dict().items():
        assert torch.equal(value, raw["denoiser." + key].to(value.dtype)), key


def test_the_worker_warm_starts_then_resumes_its_own_checkpoint_without_ray(tmp_path):
    """The same worker path on one gloo rank in a subprocess (tests/init_from_rank.py): no Ray cluster,
    so it also runs where Ray cannot start in time."""
    import subprocess
    import sys

    from tests.data_helpers import free_port

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, os.path.join(repo, "tests", "init_from_rank.py"), str(tmp_path),
                           str(free_port())], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("initialised from ema weights of") and "low32/checkpoints/step-4" in line
               for line in lines), done.stdout
    assert any("ignored: the run resumes from its own checkpoint" in line and "warm64/checkpoints/step-4" in line
               for line in lines), done.stdout
    assert any(line.startswith("resumed from") and "(step 4," in line for line in lines), done.stdout
