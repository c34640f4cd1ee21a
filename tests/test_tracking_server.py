"""Training against a real `mlflow server` on 127.0.0.1, and surviving its disappearance."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.test_trainer_support import metric_history, ray_cluster, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.process = None

    def start(self, timeout_s: float = 420) -> "MlflowServer":  # a wait on /health: long only on a loaded machine
        mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
        assert shutil.which(mlflow_bin), "the full mlflow package (with its server) is required"
        self.process = subprocess.Popen(
            [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", f"{self.root}/artifacts"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server did not come up on {self.uri}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the server and its workers
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow", _free_port())
    (tmp_path / "mlflow").mkdir()
    server.start()
    yield server
    server.stop()


def test_training_logs_to_a_tracking_server_and_survives_its_loss(tmp_path, ray_cluster, mlflow_server,  # noqa: F811
                                                                   monkeypatch):
    from mlflow.tracking import MlflowClient

    from cluster.driver.launch import launch
    from cluster.driver.prepare import run_paths
    from trainer.checkpoint.store import CheckpointStore

    cfg = tiny_config(tmp_path, "served", [f"tracking.uri={mlflow_server.uri}", "tracking.flush_timeout_s=3"])
    monkeypatch.setenv("DIP_FAULT_STEP_SLEEP_S", "0.4")  # room for the server to vanish mid-run

    def take_the_server_away():  # after step-8 is committed, the server dies; training must go on
        store_dir = run_paths(cfg).checkpoint_uri
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if os.path.isdir(store_dir) and CheckpointStore(store_dir).verify(8).ok:
                mlflow_server.stop()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=take_the_server_away, daemon=True)
    killer.start()
    summary = launch(cfg)
    killer.join(timeout=5)
    assert summary.status == "FINISHED" and summary.steps == 12  # the run did not notice beyond warnings
    assert CheckpointStore(summary.checkpoint_dir).latest_committed() == 12

    mlflow_server.start()  # same backend store: read back what reached it before it went away
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.params["model.name"] == "DiP-T/16" and run.data.tags["world_size"] == "2"
    losses = metric_history(mlflow_server.uri, summary.mlflow_run_id)
    assert set(range(1, 9)) <= set(losses)  # flushed at the step-4 and step-8 checkpoints
    for key in ("lr", "images_per_s", "data_wait_share", "peak_memory_mb", "grad_norm"):
        assert client.get_metric_history(summary.mlflow_run_id, key), key
    assert "config" in {a.path for a in client.list_artifacts(summary.mlflow_run_id)}
