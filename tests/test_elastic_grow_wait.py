"""The checkpoint before an elastic grow never blocks Ray Train's controller (cluster/driver/elastic.py).

A real local Ray cluster (2 CPUs) and Ray Train's real controller with this project's grow policy, a
commit timeout of 1800 s: an elastic [1, 2] group starts with 1 worker (a placeholder actor holds the
other CPU); the placeholder goes, Ray sees capacity for 2, and the policy asks the workers for a
checkpoint. The worker sees the request and never answers; the test SIGKILLs it. The controller must
notice the dead worker at once and handle it as any failure (FailureConfig: one restart, now with 2
workers, which see no request and finish), not after the 1800 s the policy would wait for an answer.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import pytest

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


def test_a_worker_killed_while_the_grow_waits_for_its_checkpoint_is_handled_as_any_failure(tmp_path):
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.driver.elastic import checkpoint_before_grow_policy, trainer_with_policy
    from trainer.checkpoint.store import CheckpointStore

    notes, checkpoints = tmp_path / "notes", str(tmp_path / "checkpoints")
    notes.mkdir()
    store = CheckpointStore(checkpoints)
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, _node_ip_address="127.0.0.1",
             log_to_driver=True)
    try:
        @ray.remote(num_cpus=1)
        class Placeholder:
            def ready(self) -> bool:
                return True

        placeholder = Placeholder.remote()
        ray.get(placeholder.ready.remote())
        trainer_cls = trainer_with_policy(TorchTrainer, lambda scaling: checkpoint_before_grow_policy(
            scaling, checkpoints, timeout_s=COMMIT_TIMEOUT_S))
        trainer = trainer_cls(
            grow_probe, train_loop_config={"checkpoints": checkpoints, "notes": str(notes)},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1},
                                         elastic_resize_monitor_interval_s=1),
            run_config=RunConfig(name="grow-wait", storage_path=str(tmp_path / "ray"),
                                 failure_config=FailureConfig(max_failures=1)))
        outcome: dict = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except Exception as error:  # re-raised below, in the test's thread
                outcome["error"] = error

        fitting = threading.Thread(target=fit, daemon=True)
        fitting.start()
        _wait_for(lambda: _attempts(str(notes)), 240, "the 1-worker group")
        ray.kill(placeholder)  # capacity for a second worker: Ray's elastic monitor decides to grow
        seen = _wait_for(lambda: (notes / "request-seen.json").exists() and json.loads(
            (notes / "request-seen.json").read_text()), 120, "the pre-grow checkpoint request")
        time.sleep(2)  # the controller has been waiting for the answer a while
        os.kill(seen["pid"], signal.SIGKILL)
        killed_at = time.time()
        fitting.join(timeout=NOTICED_WITHIN_S + 60)
        assert not fitting.is_alive(), "the controller did not handle the killed worker"
        if "error" in outcome:
            raise outcome["error"]
        assert outcome["result"].error is None
    finally:
        ray.shutdown()

    attempts = _attempts(str(notes))
    assert [a["world"] for a in attempts] == [1, 2, 2], attempts  # restarted once (FailureConfig), grown to 2
    restarted = attempts[1]["started"] - killed_at
    assert restarted < NOTICED_WITHIN_S, f"the restart came {restarted:.0f} s after the kill"
    # the failure withdrew the request: the restarted group saw none, and none is left
    assert not any(a["request_seen_at_start"] for a in attempts[1:])
    assert store.resize_request() is None and not (tmp_path / "checkpoints" / "RESIZE_REQUESTED").exists()
    print(f"\nworker SIGKILLed {killed_at - seen['at']:.1f} s into the wait for the pre-grow checkpoint "
          f"(commit timeout {COMMIT_TIMEOUT_S} s): restarted group's first worker {restarted:.1f} s later")
