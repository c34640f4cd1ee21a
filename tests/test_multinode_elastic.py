"""Elastic runs on a real multi-node Ray cluster on 127.0.0.1 (the harness of tests/test_multinode_kill.py,
its own head and two 1-CPU worker nodes): cluster.num_workers=[1, 2], a worker node SIGKILLed and not
replaced (the run goes on with 1 worker), or back later (the run grows back to 2).

* ZeRO-2, a node lost for good: the job goes on with 1 worker (micro-batch 2 x 2 accumulations) from
  the last committed checkpoint and finishes.
* ZeRO-3, lost then back: the job shrinks, then grows back to 2 workers from a checkpoint written for
  the grow (no step computed twice), and finishes.
For both: the per-step sample keys, as sets, equal the uninterrupted run's, and the final weights are
within WEIGHTS_ATOL of it.
"""
from __future__ import annotations

import os
import re
import time

import pytest

from tests.test_multinode_kill import STEPS, _logs, _submit, _wait_for_end, _wait_for_first_commit, _wait_for_log
from tests.test_multinode_kill import cluster  # noqa: F401  (the fixture: this module gets its own cluster)
from tests.test_multinode_support import LocalCluster
from tests.test_trainer_support import final_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


# ------------------------------------------------------------------------------------------------
#                 Elastic runs: cluster.num_workers=[1, 2], a node lost for good, a node back
# ------------------------------------------------------------------------------------------------
# The run may shrink to 1 worker and grow back to 2; the global batch stays 4 (micro-batch 2 x 2 x 1,
# or 2 x 1 x 2). canonical_nodes=1: the single-node references order their MDS samples for one node.
ELASTIC = ["cluster.num_workers=[1,2]", "cluster.resize_check_s=5", "data.canonical_nodes=1"]
# Final weights against the uninterrupted 2-worker run: the math of a step does not depend on its split
# (per-sample keyed noise; the same samples per step, checked below), so only fp32 reduction order
# differs while the run is on 1 worker (2 micro-batches accumulated instead of 2 ranks all-reduced):
# ~1e-7 per step, carried through AdamW. A different sample or noise in any step moves weights by >1e-3.
WEIGHTS_ATOL = 1e-5


def _exactly_two_worker_nodes(cluster: LocalCluster) -> None:
    for node in cluster.plain_worker_nodes()[2:]:
        cluster.kill_node(node)
    while len(cluster.plain_worker_nodes()) < 2:
        cluster.add_worker(f"w-{time.monotonic_ns() % 10 ** 8}")
    cluster.wait_for_workers(2)


def _excerpt(logs: str) -> str:
    """The lines of a job's log that tell its elastic story (for assertion messages)."""
    keep = re.compile(r"resize|elastic|resumed from|committed|Deciding|Detected|Error|error")
    return "\n".join(line[-300:] for line in logs.splitlines() if keep.search(line))[-8000:]


def _steps_by_attempt(ledger_dir: str) -> dict[str, dict]:
    """{attempt: {"world_size", "steps": {step: set of sample keys}, "first_time"}} from a sample ledger."""
    from trainer.faults import read_ledger

    attempts: dict[str, dict] = {}
    for entry in read_ledger(ledger_dir):
        attempt = attempts.setdefault(entry["attempt"], {"world_size": entry["world_size"], "steps": {},
                                                         "first_time": entry["time"]})
        attempt["steps"].setdefault(entry["step"], set()).update(entry["keys"])
        attempt["first_time"] = min(attempt["first_time"], entry["time"])
    return attempts


def _assert_same_global_batches(ledger_dir: str, reference_ledger: str) -> dict[str, dict]:
    """Every step's samples, whatever world size computed it, are the uninterrupted run's for that step."""
    (reference,) = _steps_by_attempt(reference_ledger).values()
    attempts = _steps_by_attempt(ledger_dir)
    union: dict[int, set] = {}
    for attempt in attempts.values():
        for step, keys in attempt["steps"].items():
            assert keys <= reference["steps"][step], f"step {step} on {attempt['world_size']} workers used other samples"
            union.setdefault(step, set()).update(keys)
    assert union == reference["steps"]
    return attempts


def _assert_close_to_reference(local_step_dir: str, reference) -> float:
    import torch

    model, ema = final_weights(local_step_dir)
    ref_model, ref_ema = final_weights(reference.checkpoint_dir + f"/step-{STEPS}")
    worst = 0.0
    for got, want in ((model, ref_model), (ema, ref_ema)):
        assert got.keys() == want.keys()
        for key in got:
            worst = max(worst, (got[key] - want[key]).abs().max().item())
    assert worst <= WEIGHTS_ATOL, f"final weights differ by {worst}"
    assert any(not torch.equal(model[k], ref_model[k]) for k in model) or worst == 0.0
    return worst


def _start_elastic_job(cluster: LocalCluster, name: str, tmp_path, stage: int, step_sleep_s: float,
                       env: tuple[str, ...] = ()):
    """Two worker nodes, an elastic job of TINY at `stage` with its sample ledger; returns once its first
    checkpoint is committed: (job id, its checkpoint store, the ledger directory)."""
    from trainer.checkpoint.store import CheckpointStore

    _exactly_two_worker_nodes(cluster)
    out, ledger = str(tmp_path / "runs"), tmp_path / "ledger"
    ledger.mkdir()
    job_id = _submit(cluster, name, out, extra=ELASTIC + [f"train.zero_stage={stage}"],
                     env=[f"DIP_FAULT_STEP_SLEEP_S={step_sleep_s}", f"DIP_FAULT_SAMPLE_LEDGER={ledger}", *env])
    store = CheckpointStore(os.path.join(out, name, "checkpoints"))
    assert _wait_for_first_commit(store, job_id, cluster) < STEPS
    return job_id, store, str(ledger)


def test_elastic_zero2_run_goes_on_with_one_worker_when_a_node_is_lost_for_good(zero2_reference, cluster, tmp_path):
    from trainer.checkpoint.manager import load_train_state

    job_id, store, ledger = _start_elastic_job(cluster, "shrink", tmp_path, stage=2, step_sleep_s=0.5)
    killed_at = time.time()
    assert cluster.kill_node(cluster.plain_worker_nodes()[0]) >= 3  # and no node comes to replace it
    status = _wait_for_end(cluster, job_id)
    logs = _logs(cluster, job_id)
    assert status == "SUCCEEDED", _excerpt(logs)
    assert re.search(r"resize 1: step \d+: 2 -> 1 workers \(a node was lost\); micro-batch 2 x 1 workers x 2 "
                     r"accumulation = 4 images per step; ZeRO state re-partitioned", logs), _excerpt(logs)
    state = load_train_state(store, STEPS)
    assert state["world_size"] == 1 and state["resizes"] == 1 and state["samples_seen"] == STEPS * 4
    attempts = _assert_same_global_batches(ledger, zero2_reference.ledger)
    shrunk = [a for a in attempts.values() if a["world_size"] == 1]
    assert len(shrunk) == 1 and max(shrunk[0]["steps"]) == STEPS - 1  # the 1-worker group finished the run
    recover_s = shrunk[0]["first_time"] - killed_at
    worst = _assert_close_to_reference(store.step_path(STEPS), zero2_reference)
    print(f"\nelastic shrink (ZeRO-2): node lost -> first step on 1 worker in {recover_s:.1f} s; "
          f"resumed from step {min(shrunk[0]['steps'])}; final weights within {worst:.2e} of the uninterrupted run")


def test_elastic_zero3_run_shrinks_then_grows_back_when_a_node_rejoins(zero3_reference, cluster, tmp_path):
    from trainer.checkpoint.manager import load_train_state

    # the 1-worker group's steps slowed (6 s each, up to 48 s in all) so that the grow lands mid-run however
    # long the returning raylet takes to start on a busy machine (then Ray checks every 5 s, and the
    # workers checkpoint at the next stop check); the grown group goes at 1 s a step
    job_id, store, ledger = _start_elastic_job(cluster, "regrow", tmp_path, stage=3, step_sleep_s=1,
                                               env=("DIP_FAULT_STEP_SLEEP_AT=1:6",))
    killed_at = time.time()
    cluster.kill_node(cluster.plain_worker_nodes()[0])
    _wait_for_log(cluster, job_id, "resize 1: ")
    cluster.add_worker(f"w-back-{os.getpid()}")  # capacity comes back while the run goes on with 1 worker
    status = _wait_for_end(cluster, job_id)
    logs = _logs(cluster, job_id)
    assert status == "SUCCEEDED", _excerpt(logs)
    assert re.search(r"resize 1: step \d+: 2 -> 1 workers \(a node was lost\)", logs), _excerpt(logs)
    grow = re.search(r"resize 2: step (\d+): 1 -> 2 workers \(capacity came back\); micro-batch 2 x 2 workers x 1 "
                     r"accumulation", logs)
    assert grow, _excerpt(logs)
    assert f"checkpoint for the resize written at step {grow.group(1)}" in logs, _excerpt(logs)
    state = load_train_state(store, STEPS)
    assert state["world_size"] == 2 and state["resizes"] == 2 and state["samples_seen"] == STEPS * 4
    attempts = _assert_same_global_batches(ledger, zero3_reference.ledger)
    alone = [a for a in attempts.values() if a["world_size"] == 1]
    regrown = [a for a in attempts.values() if a["world_size"] == 2 and min(a["steps"]) == int(grow.group(1))]
    assert len(alone) == 1 and len(regrown) == 1
    # the grow restarts from a checkpoint written for it: no step of the 1-worker group is computed twice
    assert max(alone[0]["steps"]) == int(grow.group(1)) - 1
    worst = _assert_close_to_reference(store.step_path(STEPS), zero3_reference)
    print(f"\nelastic shrink + grow (ZeRO-3): node lost -> first step on 1 worker in "
          f"{alone[0]['first_time'] - killed_at:.1f} s; grown back at step {grow.group(1)}; "
          f"final weights within {worst:.2e} of the uninterrupted run")
