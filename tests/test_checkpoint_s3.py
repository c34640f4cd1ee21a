"""Checkpoints on object storage: a real S3-compatible server (moto_server) on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.test_trainer_support import ray_cluster, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # a moto_server process
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory):
    """A fresh bucket on a moto_server; pyarrow and boto3 find it through AWS_ENDPOINT_URL."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket="dip-ckpt")
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not come up")
            time.sleep(0.3)
    yield "s3://dip-ckpt"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _commit(store, step: int, world: int = 2) -> None:
    for rank in range(world):
        state = {"w": torch.full((4,), float(step + rank))}
        size = store.write_stream(f"step-{step}/shard-{rank}.pt", lambda f, s=state: torch.save(s, f))
        store.report_done(step, rank, "a1", {f"shard-{rank}.pt": size})
    store.commit(step, store.wait_for_ranks(step, world, "a1", timeout_s=10), {"world_size": world})


def test_commit_verify_prune_and_download_on_s3(s3_bucket, tmp_path):
    from trainer.checkpoint.store import CheckpointStore

    store = CheckpointStore(f"{s3_bucket}/unit")
    assert not store.is_local and store.steps() == []
    for step in (2, 4, 6):
        _commit(store, step)
    for rank in range(2):  # a write that never committed
        store.write_stream(f"step-8/shard-{rank}.pt", lambda f: f.write(b"partial"))
    assert store.steps() == [2, 4, 6, 8] and store.latest_committed(warn=False) == 6
    assert store.prune(keep=2) == [2]
    assert store.steps() == [4, 6, 8]
    local = store.local_dir(6, str(tmp_path / "cache"))
    assert sorted(os.listdir(local)) == ["shard-0.pt", "shard-1.pt"]
    loaded = torch.load(os.path.join(local, "shard-1.pt"), weights_only=True)
    assert torch.equal(loaded["w"], torch.full((4,), 7.0))
    # an object rewritten shorter than the marker says is refused
    store.write_stream("step-6/shard-0.pt", lambda f: f.write(b"torn"))
    assert "truncated" in store.verify(6).reason and store.latest_committed(warn=False) == 4
    assert store.display(4) == f"{s3_bucket}/unit/step-4"


def test_training_checkpoints_to_s3_and_resumes_from_it(s3_bucket, tmp_path, ray_cluster):  # noqa: F811
    from cluster.driver.launch import launch
    from trainer.checkpoint.manager import load_train_state
    from trainer.checkpoint.store import CheckpointStore

    overrides = [f"checkpoint.path={s3_bucket}/runs", "train.max_steps=4"]
    first = launch(tiny_config(tmp_path, "s3run", overrides))
    assert first.status == "FINISHED" and first.checkpoint_dir == f"{s3_bucket}/runs/s3run"
    store = CheckpointStore(first.checkpoint_dir)
    assert store.latest_committed() == 4
    second = launch(tiny_config(tmp_path, "s3run", [f"checkpoint.path={s3_bucket}/runs", "train.max_steps=8"]))
    assert second.status == "FINISHED" and second.steps == 8
    assert second.mlflow_run_id == first.mlflow_run_id
    state = load_train_state(store, 8)
    assert state["step"] == 8 and state["samples_seen"] == 8 * 2 * 2
