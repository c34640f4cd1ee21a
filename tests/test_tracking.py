"""MLflow behind a background queue: real sqlite store, real client, an unreachable server."""
import socket
import time

import pytest

from trainer.tracking.run_logger import RunLogger, embedded_uri, finish_run, open_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_open_run_logs_params_and_tags_and_reopens_by_id(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = embedded_uri(str(tmp_path))
    run_id = open_run(uri, "dip-test", "r1", {"optim.lr": "0.001", "train.zero_stage": "2"},
                      {"world_size": "2", "git_commit": "abc"}, str(tmp_path / "artifacts"))
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params == {"optim.lr": "0.001", "train.zero_stage": "2"}
    assert run.data.tags["world_size"] == "2" and run.data.tags["dip.run_name"] == "r1"
    assert run.info.artifact_uri.startswith(f"file://{tmp_path}/artifacts")
    finish_run(uri, run_id, "KILLED")
    again = open_run(uri, "dip-test", "r1", {"optim.lr": "0.001"}, {"resumed": "yes"}, None, resume_run_id=run_id)
    assert again == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["resumed"] == "yes"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_metrics_and_artifacts_reach_the_sqlite_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = embedded_uri(str(tmp_path))
    run_id = open_run(uri, "dip-test", "r1", {}, {}, str(tmp_path / "artifacts"))
    logger = RunLogger(uri, run_id)
    for step in range(1, 251):  # more than one log_batch of metrics
        logger.log_metrics({"loss": 1.0 / step, "lr": 1e-3, "grad_norm": None}, step)
    card = tmp_path / "card.md"
    card.write_text("# card")
    logger.log_artifact(str(card), "docs")
    logger.set_tags({"phase": "done"})
    assert logger.close(timeout_s=60)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 251))
    assert {m.step: m.value for m in history}[4] == pytest.approx(0.25)
    assert client.get_metric_history(run_id, "grad_norm") == []  # None is left out, never faked
    assert [a.path for a in client.list_artifacts(run_id, "docs")] == ["docs/card.md"]
    assert client.get_run(run_id).data.tags["phase"] == "done"


def test_items_mlflow_rejects_for_good_are_dropped_once_and_hold_up_nothing(tmp_path, caplog):
    """A vanished artifact and image file, an invalid metric name, a value that is no number: each is dropped
    after a few attempts, with one warning and a count; everything around them arrives, and flushes
    (every checkpoint flushes) do not wait for them."""
    from mlflow.tracking import MlflowClient

    uri = embedded_uri(str(tmp_path))
    run_id = open_run(uri, "dip-test", "r1", {}, {}, str(tmp_path / "artifacts"))
    logger = RunLogger(uri, run_id, retry_min_s=0.05, warn_every_s=0.0)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    with caplog.at_level("WARNING", logger="dip.tracking"):
        logger.log_artifact(str(grid), "samples")
        logger.log_image(str(grid), "samples/grid", 1)
        grid.unlink()  # removed before the queue got to them
        logger.log_metrics({"loss": 1.0, "ema loss (bad name)!": 2.0, "lr": 0.1}, 1)  # one batch, one bad name
        logger.log_metrics({"loss": 0.5, "note": "warming up"}, 2)  # a value that is no number
        logger.set_tags({"phase": "warmup"})
        for step in range(3, 8):
            logger.log_metrics({"loss": 1.0 / step}, step)
        start = time.monotonic()
        assert logger.flush(timeout_s=15)
        assert time.monotonic() - start < 10
    client = MlflowClient(tracking_uri=uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 8))
    assert [m.value for m in client.get_metric_history(run_id, "lr")] == [0.1]  # the bad name's batch-mate
    assert client.get_run(run_id).data.tags["phase"] == "warmup"
    assert logger.rejected == 4 and logger.backlog == 0
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 4, warnings
    assert any("artifact" in w and "grid.png" in w for w in warnings)
    assert any("image" in w and "grid.png" in w for w in warnings) and any("ema loss (bad name)!" in w for w in warnings)
    assert any("'note'" in w for w in warnings)
    logger.log_metrics({"loss": 0.1}, 8)
    start = time.monotonic()
    assert logger.flush(timeout_s=15) and time.monotonic() - start < 2  # nothing stuck in the queue
    assert logger.close(timeout_s=5)


def test_an_unreachable_server_never_blocks_the_caller(caplog):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens here
    logger = RunLogger(uri, "0" * 32, retry_min_s=0.05, retry_max_s=0.2, warn_every_s=0.0)
    start = time.perf_counter()
    for step in range(1000):
        logger.log_metrics({"loss": 0.5}, step)
    assert time.perf_counter() - start < 0.5  # 1000 calls: queue appends only
    assert logger.flush(timeout_s=0.5) is False
    deadline = time.monotonic() + 10
    while logger.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logger.failures >= 1 and logger.backlog == 1000  # kept, not dropped
    with caplog.at_level("WARNING", logger="dip.tracking"):
        assert logger.close(timeout_s=0.2) is False
    assert "not logged before exit" in caplog.text


def test_a_full_buffer_drops_the_oldest_and_counts_them():
    uri = f"http://127.0.0.1:{_free_port()}"
    logger = RunLogger(uri, "0" * 32, max_pending=10, retry_min_s=5.0)
    for step in range(25):
        logger.log_metrics({"loss": float(step)}, step)
    assert logger.dropped >= 14 and logger.backlog <= 11
    logger.close(timeout_s=0.1)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    """One sqlite store for the tests below (each opens its own run): creating a store costs seconds."""
    root = tmp_path_factory.mktemp("mlflow-store")
    return embedded_uri(str(root)), str(root / "artifacts")


def test_grids_become_step_keyed_images_once_per_step(tmp_path, store_uri):
    """RunLogger.log_image: MLflow's log_image(key=, step=) files, which the UI's image chart shows over steps."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    uri, artifacts = store_uri
    run_id = open_run(uri, "dip-test", "images", {}, {}, artifacts)
    logger = RunLogger(uri, run_id)
    grid = tmp_path / "grid.png"
    Image.fromarray(np.full((6, 10, 3), 200, np.uint8)).save(grid)
    for step in (4, 8, 8):  # the last grid and the final one can fall on one step: shown once
        logger.log_image(str(grid), "samples", step)
    assert logger.close(timeout_s=60)
    client = MlflowClient(tracking_uri=uri)
    names = [a.path.split("/", 1)[1] for a in client.list_artifacts(run_id, "images")]
    pngs = sorted(n for n in names if n.endswith(".png") and not n.endswith("+compressed.png"))
    assert [n.split("+")[:3] for n in pngs] == [["samples", "step", "4"], ["samples", "step", "8"]]
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"].lower() == "true"
    local = client.download_artifacts(run_id, f"images/{pngs[0]}", str(tmp_path / "back"))
    assert np.asarray(Image.open(local)).shape == (6, 10, 3)


def test_system_metrics_log_even_a_run_shorter_than_one_interval_under_its_node_id(store_uri):
    from mlflow.tracking import MlflowClient

    from trainer.tracking.run_logger import SystemMetrics

    uri, artifacts = store_uri
    run_id = open_run(uri, "dip-test", "system", {}, {}, artifacts)
    monitor = SystemMetrics(uri, run_id, interval_s=60.0, node_id="node_1")
    time.sleep(0.3)
    monitor.stop()  # long before the first interval ends: MLflow's own finish() would log nothing
    metrics = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_megabytes"):
        assert f"system/node_1/{name}" in metrics, sorted(metrics)
    assert 0 < metrics["system/node_1/system_memory_usage_megabytes"]


def test_system_metrics_follow_the_switch_and_sample_once_per_node():
    from trainer.config import TrackingSection
    from trainer.tracking.run_logger import node_placement, placement, start_system_metrics

    assert start_system_metrics(TrackingSection(system_metrics=False), "sqlite:///unused.db", "r" * 32, 0) is None
    assert start_system_metrics(TrackingSection(), "sqlite:///unused.db", "", 0) is None  # no MLflow run
    # a single process (no process group): it samples its machine, without a node id
    assert node_placement(0) == (True, None)
    # 4 ranks on 2 nodes (as Ray puts them, in any order): the lowest rank of each node samples it
    nodes = ["n-b", "n-a", "n-b", "n-a"]
    assert [placement(nodes, rank) for rank in range(4)] == [(True, "node_0"), (True, "node_1"),
                                                             (False, "node_0"), (False, "node_1")]
    assert [placement(["n-a"] * 2, rank) for rank in range(2)] == [(True, None), (False, None)]  # one node
