"""The checkpoint before an elastic grow never blocks Ray Train's controller (cluster/driver/elastic.py).

A real Ray cluster of `ray start` nodes (tests/test_multinode_support.py: a head without CPUs and one
1-CPU worker node, then a second) and Ray Train's real controller, driven from this process, with this
project's grow policy and a commit timeout of 1800 s: an elastic [1, 2] group starts with 1 worker; the
second node joins, Ray sees capacity for 2 (its elastic policy counts the nodes' resources, so a
single-node cluster cannot grow), and the policy asks the workers for a checkpoint. The worker sees the request and never answers; the test SIGKILLs it. The controller must
notice the dead worker at once and handle it as any failure (FailureConfig: one restart, now with 2
workers, which see no request and finish), not after the 1800 s the policy would wait for an answer.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.test_multinode_support import REPO, LocalCluster

pytestmark = pytest.mark.slow
COMMIT_TIMEOUT_S = 1800
NOTICED_WITHIN_S = 90  # kill -> the restarted group's first line, on a busy 2-core machine


def _write(path: str, payload: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f)
    os.replace(path + ".tmp", path)


def grow_probe(config: dict) -> None:
    """The train function: notes each attempt; the 1-worker group waits for the pre-grow request and then
    hangs (it never answers); the grown group ends at once."""
    import ray.train

    from trainer.checkpoint.store import CheckpointStore

    context = ray.train.get_context()
    store = CheckpointStore(config["checkpoints"])
    world, rank = context.get_world_size(), context.get_world_rank()
    _write(os.path.join(config["notes"], f"attempt-{uuid.uuid4().hex}-rank{rank}.json"),
           {"world": world, "rank": rank, "pid": os.getpid(), "started": time.time(),
            "request_seen_at_start": store.resize_requested()})
    if world > 1:
        return
    while not store.resize_requested():
        time.sleep(0.1)
    _write(os.path.join(config["notes"], "request-seen.json"), {"pid": os.getpid(), "at": time.time()})
    while True:  # a checkpoint that never comes: the test kills this process
        time.sleep(1)


def _attempts(notes: str) -> list[dict]:
    out = []
    for name in os.listdir(notes):
        if name.startswith("attempt-") and name.endswith(".json"):
            with open(os.path.join(notes, name)) as f:
                out.append(json.load(f))
    return sorted(out, key=lambda a: a["started"])


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def drive(notes: str, checkpoints: str, storage: str) -> None:
    """The cluster's driver (its own process: Ray reads the auth token from the environment at import):
    an elastic [1, 2] TorchTrainer with the grow policy; writes what fit() returned to notes/outcome.json."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.driver.elastic import checkpoint_before_grow_policy, trainer_with_policy

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    trainer_cls = trainer_with_policy(TorchTrainer, lambda scaling: checkpoint_before_grow_policy(
        scaling, checkpoints, timeout_s=COMMIT_TIMEOUT_S))
    trainer = trainer_cls(
        grow_probe, train_loop_config={"checkpoints": checkpoints, "notes": notes},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1},
                                     elastic_resize_monitor_interval_s=1),
        run_config=RunConfig(name="grow-wait", storage_path=storage, failure_config=FailureConfig(max_failures=1)))
    try:
        result = trainer.fit()
        outcome = {"error": None if result.error is None else repr(result.error)}
    except Exception as error:  # reported to the test, which fails on it
        outcome = {"error": repr(error)}
    _write(os.path.join(notes, "outcome.json"), {**outcome, "ended": time.time()})
    ray.shutdown()


def test_a_worker_killed_while_the_grow_waits_for_its_checkpoint_is_handled_as_any_failure(tmp_path):
    from trainer.checkpoint.store import CheckpointStore

    notes, checkpoints = tmp_path / "notes", str(tmp_path / "checkpoints")
    notes.mkdir()
    store = CheckpointStore(checkpoints)
    cluster = LocalCluster(root=str(tmp_path / "cluster"))
    driver = None
    try:
        cluster.start_head()
        cluster.add_worker("w1")
        cluster.wait_for_workers(1)
        env = dict(os.environ, **cluster.client_env, RAY_ADDRESS=cluster.gcs_address, PYTHONPATH=REPO)
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen([sys.executable, __file__, str(notes), checkpoints, str(tmp_path / "ray")],
                                  env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _wait_for(lambda: _attempts(str(notes)), 240, "the 1-worker group")
        cluster.add_worker("w2")  # capacity for a second worker: Ray's elastic monitor decides to grow
        seen = _wait_for(lambda: (notes / "request-seen.json").exists() and json.loads(
            (notes / "request-seen.json").read_text()), 120, "the pre-grow checkpoint request")
        time.sleep(2)  # the controller has been waiting for the answer a while
        os.kill(seen["pid"], signal.SIGKILL)
        killed_at = time.time()
        assert driver.wait(timeout=NOTICED_WITHIN_S + 60) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.teardown()

    outcome = json.loads((notes / "outcome.json").read_text())
    assert outcome["error"] is None, outcome
    attempts = _attempts(str(notes))
    assert [a["world"] for a in attempts] == [1, 2, 2], attempts  # restarted once (FailureConfig), grown to 2
    restarted = attempts[1]["started"] - killed_at
    assert restarted < NOTICED_WITHIN_S, f"the restart came {restarted:.0f} s after the kill"
    # the failure withdrew the request: the restarted group saw none, and none is left
    assert not any(a["request_seen_at_start"] for a in attempts[1:])
    assert store.resize_request() is None and not (tmp_path / "checkpoints" / "RESIZE_REQUESTED").exists()
    print(f"\nworker SIGKILLed {killed_at - seen['at']:.1f} s into the wait for the pre-grow checkpoint "
          f"(commit timeout {COMMIT_TIMEOUT_S} s): restarted group's first worker {restarted:.1f} s later")


if __name__ == "__main__":  # the driver process of the test above (PYTHONPATH: the repository)
    drive(*sys.argv[1:4])
