"""A real multi-node Ray cluster on 127.0.0.1, jobs submitted with `dip submit`, nodes lost mid-run.

One head (no CPUs: job drivers + control plane, dashboard/job server on loopback) and two 1-CPU
worker nodes, each a separate `ray start`; the quickstart config shrunk to 12 steps, 2 ranks,
ZeRO-2, a committed checkpoint every 4 steps.

* reference: the same run, uninterrupted.
* SIGKILL: once the first checkpoint is committed, every process of one worker node is SIGKILLed;
  a replacement node joins; the job must finish by itself (Ray Train restarts the worker group,
  which resumes from the last committed checkpoint) with weights bit-identical to the reference.
* preemption on object storage: checkpoints and shards on an S3 server (moto) only, as on a cluster
  without a shared file system; one worker node runs under cluster/manifests/ray-node.sh and gets
  SIGTERM (what Kubernetes and Slurm send) mid-run: the node is drained in Ray, the run writes a
  committed just-in-time checkpoint (the only one before the end), the node goes, a replacement
  joins, and the run resumes from that checkpoint and ends bit-identical to the reference.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.test_multinode_support import LocalCluster, free_port, run_dip
from tests.test_trainer_support import assert_bit_identical, final_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4
# the preemption test's timeline (see there): a JIT checkpoint must fit in GRACE_S, with room to spare on a
# slow machine, and the run must still be going when the node leaves GRACE_S after the SIGTERM
STEP_SLEEP_S, GRACE_S = 10, 60
JOB_TIMEOUT_S = 900


def _tiny(run_name: str, output_dir: str) -> list[str]:
    return [f"run_name={run_name}", f"output_dir={output_dir}", "model.num_classes=4", "data.resolution=16",
            "data.batch_size=2", "data.synthetic_images=48", "data.synthetic_classes=4", f"train.max_steps={STEPS}",
            "train.log_every=1", "train.stop_check_every=2", f"checkpoint.every_steps={EVERY}", "checkpoint.keep=4",
            "checkpoint.async_save=false", "samples.num_classes=2", "samples.per_class=2", "samples.steps=2",
            "optim.ema_decay=0.9", "optim.warmup_steps=2", "optim.grad_clip=1.0", "cluster.max_failures=3",
            "tracking.flush_timeout_s=30", "model.init=authors", "eval.enabled=false"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(root=str(tmp_path_factory.mktemp("multinode")))
    try:
        c.start_head()
        c.add_worker("w1")
        c.add_worker("w2")
        c.wait_for_workers(2)
        yield c
    finally:
        c.teardown()


def _submit(cluster: LocalCluster, run_name: str, output_dir: str, extra: list[str] = (), env: list[str] = ()) -> str:
    job_id = f"{run_name}-{os.getpid()}"
    args = ["submit", "configs/quickstart_cpu.yaml", *_tiny(run_name, output_dir), *extra, "--address",
            cluster.address, "--job-id", job_id, "--stop-grace-s", "60"]
    for pair in env:
        args += ["--env", pair]
    out = run_dip(args, env=cluster.client_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"job id     : {job_id}" in out.stdout
    assert f"dashboard  : {cluster.address}/#/jobs/{job_id}" in out.stdout
    return job_id


ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def _status(cluster: LocalCluster, job_id: str) -> str:
    """The job's status through Ray's Jobs SDK, in this process (a poll is an HTTP request, not a process)."""
    return str(cluster.job_client().get_job_status(job_id).value)


def _wait_for_end(cluster: LocalCluster, job_id: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = _status(cluster, job_id)
        if status in ENDED:
            return status
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} still running after {JOB_TIMEOUT_S} s")


def _logs(cluster: LocalCluster, job_id: str) -> str:
    return cluster.job_client().get_job_logs(job_id)


def _cli_status(cluster: LocalCluster, job_id: str) -> str:
    """`dip jobs status` as a user runs it (once per test module: the CLI is what it checks)."""
    out = run_dip(["jobs", "status", job_id, "--address", cluster.address], env=cluster.client_env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("status    : ", 1)[1].split()[0]


def _cli_logs(cluster: LocalCluster, job_id: str) -> str:
    """`dip jobs logs` as a user runs it."""
    out = run_dip(["jobs", "logs", job_id, "--address", cluster.address], env=cluster.client_env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _watch_commits(store, seen: set, stop: threading.Event) -> threading.Thread:
    """Record every checkpoint step that is ever committed (pruning removes old ones later)."""
    def loop():
        while not stop.is_set():
            try:
                seen.update(store.committed_steps(warn=False))
            except Exception:  # the directory / bucket prefix may not exist yet
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _wait_for_first_commit(store, job_id: str, cluster: LocalCluster) -> int:
    """The step of the job's first committed checkpoint (its COMMITTED marker), as soon as there is one."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    looks = 0
    while time.monotonic() < deadline:
        ended = looks % 10 == 0 and _status(cluster, job_id) in ENDED  # asked before the look: no race
        try:
            latest = store.latest_committed(warn=False)
        except Exception:  # the run's checkpoint directory does not exist yet
            latest = None
        if latest is not None:
            return latest
        if ended:
            raise AssertionError(f"job {job_id} ended without a committed checkpoint:\n{_logs(cluster, job_id)[-5000:]}")
        looks += 1
        time.sleep(0.2)
    raise TimeoutError(f"no committed checkpoint from job {job_id}:\n{_logs(cluster, job_id)[-5000:]}")


def _wait_for_log(cluster: LocalCluster, job_id: str, text: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        ended = _status(cluster, job_id) in ENDED  # asked before the logs: an ended job's logs are complete
        logs = _logs(cluster, job_id)
        if text in logs:
            return
        if ended:
            raise AssertionError(f"job {job_id} ended and {text!r} never appeared in its logs:\n{logs[-5000:]}")
        time.sleep(1.0)
    raise TimeoutError(f"{text!r} never appeared in the logs of job {job_id}")


@pytest.fixture(scope="module")
def reference(zero2_reference):
    """The uninterrupted run: the session's ZeRO-2 reference of the trainer tests (tests/conftest.py).
    The submitted jobs below are the same config (quickstart + _tiny == tests.test_trainer_support.TINY,
    checked here), so on any cluster layout they must end bit-identical to it."""
    from trainer.checkpoint.store import CheckpointStore
    from trainer.config import config_from_dict, load_config, to_dict
    from tests.test_trainer_support import TINY

    submitted = to_dict(load_config(os.path.join(REPO, "configs", "quickstart_cpu.yaml"), _tiny("ref2", "x")))
    tiny = to_dict(config_from_dict({**TINY, "run_name": "ref2", "output_dir": "x"}))
    for section in ("model", "data", "objective", "optim", "train"):
        assert submitted[section] == tiny[section], f"{section}: the submitted run would not match the reference"
    store = CheckpointStore(zero2_reference.checkpoint_dir)
    assert store.latest_committed() == STEPS
    return {"store": store, "run_dir": os.path.dirname(zero2_reference.checkpoint_dir)}


def test_sigkill_of_a_worker_node_mid_run_resumes_to_the_uninterrupted_weights(cluster, reference, tmp_path):
    from trainer.checkpoint.store import CheckpointStore

    out = str(tmp_path / "runs")
    job_id = _submit(cluster, "killed", out, extra=["tracking.system_metrics_interval_s=1"],
                     env=["DIP_FAULT_STEP_SLEEP_S=0.5"])  # so the kill lands mid-run
    store = CheckpointStore(os.path.join(out, "killed", "checkpoints"))
    first = _wait_for_first_commit(store, job_id, cluster)
    assert first < STEPS
    killed = cluster.kill_node("w1")
    assert killed >= 3, "raylet, agents and the rank on that node"
    cluster.add_worker("w3")  # the replacement: the run needs two 1-CPU nodes again
    status = _wait_for_end(cluster, job_id)
    logs = _cli_logs(cluster, job_id)
    assert status == "SUCCEEDED", logs[-8000:]
    assert _cli_status(cluster, job_id) == "SUCCEEDED"
    assert f"resumed from {store.display(first)}" in logs or "resumed from" in logs
    assert store.latest_committed() == STEPS
    model, ema = final_weights(store.step_path(STEPS))
    ref_model, ref_ema = final_weights(reference["store"].step_path(STEPS))
    assert_bit_identical(model, ref_model, "model weights")
    assert_bit_identical(ema, ref_ema, "EMA weights")
    listing = run_dip(["jobs", "list", "--address", cluster.address], env=cluster.client_env)
    assert job_id in listing.stdout and "SUCCEEDED" in listing.stdout
    _assert_system_metrics_per_node(os.path.join(out, "killed"))


def _assert_system_metrics_per_node(run_dir: str) -> None:
    """MLflow's system metrics of a 2-node run: one monitor per node, each under its own node id."""
    from mlflow.tracking import MlflowClient

    from trainer.tracking.run_logger import embedded_uri

    client = MlflowClient(tracking_uri=embedded_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("dip").experiment_id])
    system = {key for key in run.data.metrics if key.startswith("system/")}
    for node in ("node_0", "node_1"):
        assert f"system/{node}/cpu_utilization_percentage" in system, sorted(system)
    assert all(key.split("/")[1] in ("node_0", "node_1") for key in system), sorted(system)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """moto's S3 server on 127.0.0.1; the test process and the jobs get its endpoint and keys."""
    import boto3

    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not come up")
            time.sleep(0.3)
    try:
        yield client, env
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def _upload_dir(client, local: str, bucket: str, prefix: str) -> None:
    for dirpath, _, filenames in os.walk(local):
        for name in filenames:
            path = os.path.join(dirpath, name)
            client.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local)}")


def test_sigterm_preempts_a_node_on_object_storage_with_a_final_checkpoint(cluster, reference, s3, tmp_path):
    from trainer.checkpoint.store import CheckpointStore

    client, s3_env = s3
    # the reference's own shards, now only on S3: the same data, so the same weights are expected
    shards = [d for d, _, files in os.walk(os.path.join(reference["run_dir"], "data")) if "manifest.json" in files]
    assert len(shards) == 1, shards
    client.create_bucket(Bucket="dip-data")
    client.create_bucket(Bucket="dip-ckpt")
    _upload_dir(client, shards[0], "dip-data", "synthetic-16")

    # exactly two worker nodes, one of them under ray-node.sh (the Slurm / Kubernetes node wrapper)
    for node in cluster.plain_worker_nodes()[1:]:
        cluster.kill_node(node)
    # Timeline (the first group's steps slowed to STEP_SLEEP_S; the resumed one runs at full speed): SIGTERM
    # once the run is at step 2; the drain reaches Ray Train's preemption watcher (polled every 5 s); the
    # next stop check (every 2 steps) writes the just-in-time checkpoint; the node goes GRACE_S after the SIGTERM, mid-run; the group restarts on the
    # replacement and resumes from that checkpoint. No periodic checkpoint before the end (the checkpoint
    # section is not part of what must match the reference), so the only one to resume from is the JIT one.
    wrapper = cluster.add_worker_with_wrapper("w4", grace_s=GRACE_S)
    cluster.wait_for_workers(2)

    job_id = _submit(cluster, "preempted", str(tmp_path / "runs"),
                     extra=["checkpoint.path=s3://dip-ckpt/runs", "data.path=s3://dip-data/synthetic-16",
                            f"checkpoint.every_steps={STEPS}"],
                     env=[f"{k}={v}" for k, v in s3_env.items()] + [f"DIP_FAULT_STEP_SLEEP_FRESH_S={STEP_SLEEP_S}"])
    store = CheckpointStore("s3://dip-ckpt/runs/preempted")
    seen: set[int] = set()
    stop = threading.Event()
    _watch_commits(store, seen, stop)
    try:
        _wait_for_log(cluster, job_id, f"step 2/{STEPS}")
        wrapper.send_signal(signal.SIGTERM)  # what the kubelet / slurmd send
        cluster.add_worker("w5")
        status = _wait_for_end(cluster, job_id)
    finally:
        stop.set()
    logs = _logs(cluster, job_id)
    assert status == "SUCCEEDED", logs[-8000:]
    notices = [int(n) for n in re.findall(r"preemption notice: writing a checkpoint at step (\d+)", logs)]
    assert notices, f"no preemption notice reached the run:\n{logs[-6000:]}"
    jit = notices[0]
    assert jit < STEPS and jit in seen, f"just-in-time checkpoint {jit} not committed: committed {sorted(seen)}"
    assert f"resumed from {store.display(jit)}" in logs, logs[-6000:]  # the node went mid-run, after it
    assert wrapper.wait(timeout=120) == 0  # the wrapper stopped its own node and exited cleanly
    assert store.latest_committed() == STEPS
    local = store.local_dir(STEPS, str(tmp_path / "download"))
    model, ema = final_weights(local)
    ref_model, ref_ema = final_weights(reference["store"].step_path(STEPS))
    assert_bit_identical(model, ref_model, "model weights")
    assert_bit_identical(ema, ref_ema, "EMA weights")
