"""Shared pieces of the trainer tests: a tiny run config, a local Ray cluster, reading results back.

(No tests here; the trainer test modules import these.)
"""
from __future__ import annotations

import os

import pytest
import torch

TINY = {
    "model": {"name": "DiP-T/16", "num_classes": 4},
    "data": {"path": "synthetic", "resolution": 16, "batch_size": 2, "num_workers": 0, "synthetic_images": 48,
             "synthetic_classes": 4, "seed": 0},
    "optim": {"lr": 1.0e-3, "ema_decay": 0.9, "warmup_steps": 2, "grad_clip": 1.0},
    "train": {"max_steps": 12, "zero_stage": 2, "precision": "fp32", "log_every": 1, "stop_check_every": 2},
    "checkpoint": {"every_steps": 4, "keep": 2, "async_save": False},
    # the final-model logging costs each finished run seconds; tests/test_trainer_e2e.py turns it on
    "tracking": {"flush_timeout_s": 30.0, "log_model": False},
    "samples": {"num_classes": 2, "per_class": 2, "steps": 2},
    "cluster": {"num_workers": 2, "num_cpus": 2, "max_failures": 2, "dashboard": False},
}


def tiny_config(tmp_path, run_name: str, overrides: list[str] = ()):
    from trainer.config import config_from_dict

    raw = {**TINY, "run_name": run_name, "output_dir": str(tmp_path / "runs")}
    # every run of a test shares one synthetic cache: prepared once, read by all
    return config_from_dict(raw, list(overrides))


def start_local_ray(tries: int = 2, **kwargs) -> None:
    """ray.init of a local test cluster (2 CPUs, loopback), started again once if its start fails: a raylet
    gives its dashboard agent a fixed wait to come up, which a 2-core machine busy with the other xdist
    worker's cluster can miss (ray-project/ray#62883: "Timed out waiting for file .../metrics_agent_port_*",
    the raylet exits); that is Ray's start-up, not what any test checks."""
    import ray

    options = dict(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
                   _node_ip_address="127.0.0.1", log_to_driver=True)
    options.update(kwargs)
    for attempt in range(1, tries + 1):
        try:
            ray.init(**options)
            return
        except Exception as err:  # whatever the dead raylet made ray.init raise
            ray.shutdown()
            if attempt == tries:
                raise
            print(f"ray.init failed (try {attempt} of {tries}), starting again: {err!r}", flush=True)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if ray.is_initialized():  # another module's cluster is still up: use it, leave it to its owner
        yield
        return
    start_local_ray()
    yield
    ray.shutdown()


def final_weights(step_dir: str) -> tuple[dict, dict]:
    """(raw model weights consolidated from the ZeRO shards, EMA weights from ema.pt)."""
    from trainer.export import consolidated_model_weights

    ema = torch.load(os.path.join(step_dir, "ema.pt"), map_location="cpu", weights_only=True)["state_dict"]
    return consolidated_model_weights(step_dir), ema


def assert_bit_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs (max |diff| {(a[key] - b[key]).abs().max()})"


def metric_history(tracking_uri: str, run_id: str, key: str = "loss") -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    history: dict[int, list[float]] = {}
    for m in MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, key):
        history.setdefault(m.step, []).append(m.value)
    return history
