"""MLflow behind a background queue: logging never blocks a training step.

`RunLogger` (rank 0 of the workers, and the driver) puts metrics, tags and artifacts on a queue; a
daemon thread sends them in batches. When the tracking server is unreachable the thread keeps the
items, warns (at most every 30 s) and retries with backoff; the step loop never waits, except at
`flush(timeout)` (checkpoints, exit), which gives up after the timeout. An item MLflow rejects for
good (an invalid name, a deleted run, an artifact or image file that vanished) is isolated from the
items sent with it, retried alone behind the rest a few times, then dropped, warned about and counted
(`rejected`): it never holds up what follows it. Images go the same way, as step-keyed MLflow images. `SystemMetrics` runs MLflow's system-metrics monitor, one per node. The driver
side (`open_run`, `finish_run`) creates or reopens the one MLflow run of a training run.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dip.tracking")

MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100
MAX_REJECTIONS = 3        # attempts of an item MLflow rejects for good before it is dropped
# MLflow error codes that no retry can fix (a server that is away gives INTERNAL_ERROR / TEMPORARILY_UNAVAILABLE)
REJECTED_FOR_GOOD = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "RESOURCE_DOES_NOT_EXIST",
                     "RESOURCE_ALREADY_EXISTS", "INVALID_STATE")
FILE_KINDS = ("artifact", "image")  # items whose payload starts with a local file's path


def embedded_uri(run_dir: str) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join(run_dir, 'mlflow.db'))}"


def resolve_uri(configured: str, run_dir: str) -> str:
    """tracking.uri, or the embedded sqlite store inside the run directory when it is empty."""
    return configured or embedded_uri(run_dir)


def _limit_http_retries() -> None:
    # MLflow's REST client retries for minutes by default; our thread retries on its own schedule.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@dataclass
class _Item:
    kind: str          # "metrics" | "tags" | "artifact" | "image"
    payload: Any
    step: int = 0
    timestamp: int = 0
    rejections: int = 0    # > 0: MLflow refused it (or a batch holding it); it is sent alone from then on

    def singles(self) -> list["_Item"]:
        """One item per metric / tag: the unit MLflow accepts or rejects."""
        if self.kind in FILE_KINDS or len(self.payload) <= 1:
            return [self]
        return [_Item(self.kind, {k: v}, self.step, self.timestamp, self.rejections) for k, v in self.payload.items()]

    def describe(self) -> str:
        if self.kind in FILE_KINDS:
            return f"{self.kind} {self.payload[0]}"
        return f"{self.kind} {sorted(self.payload)}" + (f" at step {self.step}" if self.kind == "metrics" else "")


def _rejected_for_good(item: _Item, err: Exception) -> bool:
    if item.kind in FILE_KINDS:
        if not os.path.exists(item.payload[0]):
            return True  # the file is gone: no retry brings it back
        if type(err).__name__ == "UnidentifiedImageError":
            return True  # not an image PIL can read: neither will it be next time
    return getattr(err, "error_code", None) in REJECTED_FOR_GOOD


class RunLogger:
    """Non-blocking writer to one MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str, max_pending: int = 200_000,
                 retry_min_s: float = 0.5, retry_max_s: float = 30.0, warn_every_s: float = 30.0):
        _limit_http_retries()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.max_pending = max_pending
        self.retry_min_s, self.retry_max_s, self.warn_every_s = retry_min_s, retry_max_s, warn_every_s
        self.dropped = 0        # items thrown away because the buffer was full
        self.failures = 0       # failed send attempts
        self.rejected = 0       # metrics / tags / artifacts / images MLflow refused for good, dropped
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._last_warning = 0.0
        self._last_rejection_warning = float("-inf")
        self._image_steps: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._run, name="dip-mlflow", daemon=True)
        self._thread.start()

    # -- producer side: never blocks ------------------------------------------------------------
    def _put(self, item: _Item) -> None:
        with self._cond:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(item)
            self._cond.notify_all()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        clean = {}
        for key, value in metrics.items():
            if value is None:
                continue
            try:
                clean[key] = float(value)
            except (TypeError, ValueError):  # a bad value must not raise into the training step
                self._drop(_Item("metrics", {key: value}, step), f"{type(value).__name__} is not a number")
        self._put(_Item("metrics", clean, step, now))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(_Item("tags", {k: str(v) for k, v in tags.items()}))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._put(_Item("artifact", (local_path, artifact_path)))

    def log_image(self, local_path: str, key: str, step: int) -> None:
        """An image file as a step-keyed MLflow image (`log_image(key=, step=)`: the UI's image chart with
        a step slider). Once per (key, step): a grid drawn twice at one step is shown once."""
        with self._cond:
            if (key, step) in self._image_steps:
                return
            self._image_steps.add((key, step))
        self._put(_Item("image", (local_path, key), step))

    @property
    def backlog(self) -> int:
        with self._cond:
            return len(self._pending) + self._in_flight

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued so far is sent, at most timeout_s. True if all was sent."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
        return True

    def close(self, timeout_s: float) -> bool:
        sent = self.flush(timeout_s)
        if not sent:
            log.warning("MLflow at %s: %d buffered item(s) not logged before exit", self.tracking_uri, self.backlog)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        return sent

    # -- consumer side --------------------------------------------------------------------------
    def _take_batch(self) -> list[_Item]:
        """The next items to send together: a run of metric items, or one other (or once rejected) item."""
        batch: list[_Item] = []
        count = 0
        while self._pending:
            item = self._pending[0]
            if item.kind != "metrics" or item.rejections:
                if not batch:
                    batch.append(self._pending.popleft())
                break
            if count + len(item.payload) > MAX_BATCH_METRICS and batch:
                break
            batch.append(self._pending.popleft())
            count += len(item.payload)
        return batch

    def _send(self, batch: list[_Item]) -> None:
        from mlflow.entities import Metric

        first = batch[0]
        if first.kind == "metrics":
            metrics = [Metric(key, value, item.timestamp, item.step) for item in batch for key, value in item.payload.items()]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif first.kind == "tags":
            for key, value in first.payload.items():
                self.client.set_tag(self.run_id, key, value)
        elif first.kind == "artifact":
            local_path, artifact_path = first.payload
            self.client.log_artifact(self.run_id, local_path, artifact_path)
        elif first.kind == "image":
            local_path, key = first.payload
            send_image(self.client, self.run_id, local_path, key, first.step)

    def _run(self) -> None:
        backoff = self.retry_min_s
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
                batch = self._take_batch()
                self._in_flight = len(batch)
            try:
                self._send(batch)
                backoff = self.retry_min_s
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()
            except Exception as err:
                self.failures += 1
                if all(_rejected_for_good(item, err) for item in batch):
                    self._handle_rejection(batch, err)
                    continue
                # the server is away: keep the items, warn, retry later
                with self._cond:
                    self._pending.extendleft(reversed(batch))
                    self._in_flight = 0
                    self._cond.notify_all()
                now = time.monotonic()
                if now - self._last_warning >= self.warn_every_s:
                    self._last_warning = now
                    log.warning("MLflow at %s unreachable (%s); %d item(s) buffered, retrying",
                                self.tracking_uri, type(err).__name__, self.backlog)
                with self._cond:
                    if self._closed:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_s)

    def _handle_rejection(self, batch: list[_Item], err: Exception) -> None:
        """A batch MLflow refused: split it to find the culprit(s); an item refused alone goes behind
        the others, and after MAX_REJECTIONS attempts it is dropped."""
        singles = [single for item in batch for single in item.singles()]
        with self._cond:
            self._in_flight = 0
            if len(singles) > 1:  # each one alone, at once and in order: only the bad one fails again
                for single in singles:
                    single.rejections = max(single.rejections, 1)
                self._pending.extendleft(reversed(singles))
            else:
                item = singles[0]
                item.rejections += 1
                if item.rejections < MAX_REJECTIONS:
                    self._pending.append(item)  # behind everything queued: it holds up nothing
                    if len(self._pending) == 1 and not self._closed:
                        self._cond.wait(self.retry_min_s)
                else:
                    self._drop(item, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            self._cond.notify_all()

    def _drop(self, item: _Item, reason: str) -> None:
        with self._cond:  # re-entrant: also called with it held
            self.rejected += 1
            now = time.monotonic()
            if now - self._last_rejection_warning < self.warn_every_s:
                return
            self._last_rejection_warning = now
        log.warning("MLflow at %s refused %s for good (%s); dropped it (%d item(s) dropped so far, "
                    "RunLogger.rejected)", self.tracking_uri, item.describe(), reason[:300], self.rejected)


def send_image(client, run_id: str, local_path: str, key: str, step: int) -> None:
    """Log an image file at (key, step); MLflow stores it as images/<key>+step+<step>+...png (+ a webp)."""
    from PIL import Image

    with Image.open(local_path) as image:
        client.log_image(run_id, image.convert("RGB"), key=key, step=step, synchronous=True)


# ----------------------------------------------------------------------------------------------
#                                  System metrics (one monitor per node)
# ----------------------------------------------------------------------------------------------

def _node_key() -> str:
    """This process's node: the Ray node id inside Ray, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # Ray missing or not usable here: fall back to the host
        pass
    return socket.gethostname()


def node_placement(rank: int) -> tuple[bool, str | None]:
    """(whether this process samples its node, the node id for metric names). Every rank calls it: with
    torch.distributed up, the ranks exchange their node (Ray node ids, not IPs: Ray Train's local ranks
    go by IP, which several Ray nodes on one host share). The lowest rank of each node samples it; a run
    on more than one node names them node_0, node_1, ... in the order of their lowest rank, and the
    metric names carry them (system/node_1/cpu_utilization_percentage)."""
    import torch.distributed as dist

    me = _node_key()
    if dist.is_available() and dist.is_initialized():
        keys: list = [None] * dist.get_world_size()
        dist.all_gather_object(keys, me)
        return placement(keys, rank)
    return placement([me], 0)


def placement(node_of_rank: list[str], rank: int) -> tuple[bool, str | None]:
    """node_placement's rule, given every rank's node."""
    me = node_of_rank[rank]
    nodes = list(dict.fromkeys(node_of_rank))  # in the order of their lowest rank
    return node_of_rank.index(me) == rank, (f"node_{nodes.index(me)}" if len(nodes) > 1 else None)


class SystemMetrics:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network, and NVIDIA GPUs when
    nvidia-ml-py can read them) on a background thread of one process per node; never on the step's path."""

    def __init__(self, tracking_uri: str, run_id: str, interval_s: float, node_id: str | None):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # resume_logging: a resumed or restarted run continues the steps of its earlier points
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                            node_id=node_id, tracking_uri=tracking_uri)
        self.node_id = node_id
        self.monitor.start()

    def stop(self) -> None:
        """Stop sampling and send what is pending, including the samples since the last point (MLflow's
        own finish drops those: a run shorter than one interval would otherwise log none)."""
        try:
            self.monitor.finish()
            tail = self.monitor.aggregate_metrics()
            if tail:
                self.monitor.publish_metrics(tail)
                self.monitor.mlflow_logger.flush()
        except Exception as err:  # tracking must never fail the run
            log.warning("system metrics of node %s: last points not logged (%s)", self.node_id or "0", err)


def start_system_metrics(tracking, tracking_uri: str, run_id: str, rank: int) -> SystemMetrics | None:
    """With tracking.system_metrics on (a TrackingSection), a SystemMetrics on the one process of this
    node that samples it (see node_placement); None elsewhere. Every rank calls it (a collective)."""
    if not (tracking.system_metrics and run_id):
        return None
    samples, node_id = node_placement(rank)
    if not samples:
        return None
    try:
        return SystemMetrics(tracking_uri, run_id, tracking.system_metrics_interval_s, node_id)
    except Exception as err:  # e.g. the tracking server is away at start: train without them
        log.warning("system metrics off on this node: %s", err)
        return None


# ----------------------------------------------------------------------------------------------
#                                        Driver side
# ----------------------------------------------------------------------------------------------

def git_commit(repo_dir: str) -> str:
    try:
        out = subprocess.run(["git", "-C", repo_dir, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str],
             artifact_dir: str | None, resume_run_id: str | None = None) -> str:
    """Create the MLflow run of a training run, or reopen it by id on resume. Returns the run id."""
    _limit_http_retries()
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if resume_run_id:
        try:
            client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            client.log_batch(resume_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)
            return resume_run_id
        except MlflowException as err:
            log.warning("MLflow run %s of the checkpoint not found at %s (%s); starting a new MLflow run",
                        resume_run_id, tracking_uri, err.error_code)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = f"file://{os.path.abspath(artifact_dir)}" if artifact_dir else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={"dip.run_name": run_name, **tags})
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH], synchronous=True)
    return run.info.run_id


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)
    except Exception as err:  # tracking must never fail the run
        log.warning("could not mark MLflow run %s as %s: %s", run_id, status, err)


def run_url(tracking_uri: str, run_id: str, experiment_id: str | None = None) -> str:
    if tracking_uri.startswith("http"):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id or '0'}/runs/{run_id}"
    return f"run {run_id} in {tracking_uri}"
