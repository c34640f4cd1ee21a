"""A real multi-node Ray cluster on 127.0.0.1 for the cluster tests (no tests here).

Every node is its own `ray start` (a head and N worker nodes), exactly as on a real cluster, only
all on loopback. Each node's processes carry two environment markers, inherited by everything the
node starts (raylet, agents, Ray workers, the job driver):

  DIP_TEST_CLUSTER=<id>   every process of this cluster: teardown SIGKILLs them all
  DIP_TEST_NODE=<name>    the processes of one node: "losing a node" SIGKILLs exactly those

so tests never touch a Ray process they did not start (no `ray stop`, which would stop everyone's).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
WORKER_RESOURCE = "dip_test_worker"  # a custom resource only the worker nodes have


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def processes_with(marker: str, value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        if _environ(proc.pid).get(marker) == value:
            found.append(proc)
    return found


def sigkill(processes: list[psutil.Process]) -> int:
    killed = 0
    for proc in processes:
        try:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)
    return killed


# The GCS declares a killed node dead after ~5 s instead of Ray's default ~15 s (period 3 s x 5 failures):
# a restart that begins before then still counts the dead node's CPU and waits out Ray Train's worker-group
# start timeout (30 s) before it tries again with what is left.
GCS_HEALTH_CHECK = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_timeout_ms": "3000", "RAY_health_check_failure_threshold": "5"}
# Ray Train's controller restarts a failed group at once, sized by a view of the cluster that still holds
# the node just SIGKILLed; its placement group then waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (default
# 60 s) before the controller retries with what is left. The timeout bounds only the placement-group wait
# (ready in < 0.1 s here when the CPUs exist; 8 s seen once under load), and a timeout is retried, never a
# failure: 15 s cuts ~45 s from each node-loss restart (seen in the elastic tests, 2026-12-08).
RAY_TRAIN_ON_EVERY_NODE = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}


@dataclass
class LocalCluster:
    """Head (no CPUs: it runs the job driver and Ray's control plane) + worker nodes (1 CPU each)."""
    root: str
    object_store_bytes: int = 80 * 1024 * 1024
    cluster_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    # Ray 2.60 token auth, explicit on every node (worker nodes do not turn it on by themselves) and
    # private to this cluster (the home directory's ~/.ray/auth_token is never read)
    auth_token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: list[str] = field(default_factory=list)
    wrappers: dict[str, subprocess.Popen] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)
    # Ray's sockets live under its temp dir and AF_UNIX paths are limited to 107 bytes: keep it short
    ray_temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="dipray-", dir="/tmp"))
    _job_client: object = field(default=None, repr=False)
    _state_client: object = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def client_env(self) -> dict[str, str]:
        """What a client of this cluster (`dip submit`, the ray CLI) needs in its environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token}

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _env(self, node: str) -> dict[str, str]:
        env = dict(os.environ, DIP_TEST_CLUSTER=self.cluster_id, DIP_TEST_NODE=node, RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}:{os.environ.get('PATH', '')}", PYTHONPATH=REPO, **self.client_env,
                   **RAY_TRAIN_ON_EVERY_NODE, **self.extra_env)
        # Ray-internal helpers (Ray Train's placement-group cleaner) look the cluster up through
        # RAY_ADDRESS or, without it, by scanning this machine, which fails when another Ray runs here
        env["RAY_ADDRESS"] = self.gcs_address
        if node == "head":
            env.update(GCS_HEALTH_CHECK)
        return env

    def _ray_start(self, node: str, args: list[str], tries: int = 4) -> None:
        """`ray start` of one node. Ray gives a starting node a fixed 30 s to register with the GCS; on a
        2-core machine at a load of 30 that can pass: then the node's processes are SIGKILLed and it is
        started again (the failure is Ray's startup wait, not what the tests check)."""
        for attempt in range(1, tries + 1):
            common = ["--node-ip-address=127.0.0.1", f"--object-store-memory={self.object_store_bytes}",
                      f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
            log_path = os.path.join(self.root, f"ray-start-{node}-{attempt}.log")
            with open(log_path, "w") as log:
                out = subprocess.run([os.path.join(BIN, "ray"), "start", *args, *common], env=self._env(node),
                                     cwd=self.root, stdout=log, stderr=subprocess.STDOUT, timeout=180)
            if out.returncode == 0:
                self.nodes.append(node)
                return
            text = open(log_path).read()
            if "timed out during startup" not in text or attempt == tries:
                raise RuntimeError(f"ray start for {node} failed (try {attempt}): {text[-3000:]}")
            sigkill(self.node_processes(node))  # what this try left behind, before the next one

    def start_head(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        self._ray_start("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=0",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={self.dashboard_port}",
                                 f"--temp-dir={self.ray_temp_dir}"])
        self.wait_for_job_server()

    def _worker_args(self, num_cpus: int) -> list[str]:
        return [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                f"--resources={json.dumps({WORKER_RESOURCE: num_cpus})}"]

    def add_worker(self, node: str, num_cpus: int = 1) -> None:
        self._ray_start(node, [*self._worker_args(num_cpus), f"--node-name={node}"])

    def add_worker_with_wrapper(self, node: str, grace_s: int, num_cpus: int = 1) -> subprocess.Popen:
        """A worker node run by cluster/manifests/ray-node.sh, as the Slurm and Kubernetes manifests do."""
        script = os.path.join(REPO, "cluster", "manifests", "ray-node.sh")
        env = dict(self._env(node), DIP_NODE_NAME=node, DIP_PREEMPT_GRACE_S=str(grace_s),
                   RAY_BIN=os.path.join(BIN, "ray"), PYTHON_BIN=sys.executable)
        log = open(os.path.join(self.root, f"ray-node-{node}.log"), "w")
        proc = subprocess.Popen(["bash", script, *self._worker_args(num_cpus), "--node-ip-address=127.0.0.1",
                                 f"--object-store-memory={self.object_store_bytes}",
                                 f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
                                env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        self.nodes.append(node)
        self.wrappers[node] = proc
        return proc

    def wait_for_job_server(self, timeout_s: float = 120.0) -> None:
        from cluster.ray_jobs import connect  # the client `dip` uses, with Ray's auth token

        saved = {k: os.environ.get(k) for k in self.client_env}
        os.environ.update(self.client_env)  # connect() reads the token from the environment
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    connect(self.address).list_jobs()
                    return
                except Exception as err:  # not up yet: connection refused, 5xx while the modules load
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the job server at {self.address} did not come up in {timeout_s} s: {err}")
                time.sleep(0.5)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"}

    def job_client(self):
        """Ray's JobSubmissionClient for this cluster, in this process (one per cluster): what the tests
        poll job status and logs through, instead of a `dip jobs ...` process per look."""
        from ray.job_submission import JobSubmissionClient

        if self._job_client is None:
            self._job_client = JobSubmissionClient(self.address, headers=self.auth_headers)
        return self._job_client

    def alive_worker_nodes(self) -> set[str]:
        """Names of the worker nodes the GCS counts as alive (Ray's state API over the dashboard, in-process)."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        if self._state_client is None:
            self._state_client = StateApiClient(self.address, headers=self.auth_headers)
        nodes = self._state_client.list(StateResource.NODES, options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
                                        raise_on_missing_output=False)
        return {node.node_name for node in nodes if not node.is_head_node}

    def wait_for_workers(self, count: int, timeout_s: float = 180.0) -> None:
        """Until the GCS counts exactly `count` alive worker nodes, none of them one this harness killed (a
        SIGKILLed node stays alive to the GCS until its health checks fail: ~5 s here)."""
        deadline = time.monotonic() + timeout_s
        alive: set[str] | str = set()
        while time.monotonic() < deadline:
            try:
                alive = self.alive_worker_nodes()
            except Exception as err:  # the dashboard is busy or restarting its state module: look again
                alive = f"unknown ({err})"
            if isinstance(alive, set) and len(alive) == count and not alive & set(self.killed):
                return
            time.sleep(0.5)
        raise TimeoutError(f"expected {count} alive worker nodes (none of the killed {self.killed}), have {alive}")

    def wait_until_dead(self, node: str, timeout_s: float = 120.0) -> None:
        """Until the GCS no longer counts `node` (SIGKILLed) as alive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if node not in self.alive_worker_nodes():
                    return
            except Exception:  # the dashboard is busy: look again
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the GCS still counts node {node} as alive after {timeout_s} s")

    def node_processes(self, node: str) -> list[psutil.Process]:
        return [p for p in processes_with("DIP_TEST_CLUSTER", self.cluster_id) if _environ(p.pid).get("DIP_TEST_NODE") == node]

    def kill_node(self, node: str) -> int:
        """A node dies: SIGKILL its raylet, agents and Ray workers at once."""
        if node in self.nodes:
            self.nodes.remove(node)
        self.killed.append(node)
        return sigkill(self.node_processes(node))

    def plain_worker_nodes(self) -> list[str]:
        """Worker nodes started with `ray start` (not through ray-node.sh) and not killed."""
        return [n for n in self.nodes if n != "head" and n not in self.wrappers]

    def teardown(self) -> None:
        for _ in range(3):  # a dying raylet may still fork a worker: sweep until nothing is left
            procs = processes_with("DIP_TEST_CLUSTER", self.cluster_id)
            if not procs:
                break
            sigkill(procs)
        # streaming segments of our killed ranks, only those no live process maps (never
        # streaming's clean_stale_shared_memory(): it unlinks every run's segments on the machine)
        from data.shm import clean_stale_streaming_state

        clean_stale_streaming_state()
        shutil.rmtree(self.ray_temp_dir, ignore_errors=True)


def run_dip(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`dip ...` as a user runs it: a separate process."""
    full_env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
