"""The Ray Jobs client side of `dip submit` / `dip jobs`: every call to a cluster's job server (Ray
Jobs SDK, with the cluster's auth token), and the dashboard / MLflow links printed for a job. The job
itself (runtime_env, entrypoint, metadata) is built without a cluster in cluster/submit.py."""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass

from cluster.submit import SubmitRequest, exact_pins, new_submission_id, prepare, read_dependencies


class ClusterUnreachable(RuntimeError):
    """The job server did not answer; nothing was submitted."""


def resolve_address(address: str | None) -> str:
    """The job server URL: --address, else $RAY_ADDRESS. Must be the dashboard's http(s) URL."""
    value = address or os.environ.get("RAY_ADDRESS", "")
    if not value:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / job server "
                         "of the head node) or set RAY_ADDRESS")
    if not re.match(r"^https?://[^/\s:]+(:\d+)?/?$", value):
        raise ValueError(f"--address={value!r} is not a job server URL: expected http://HEAD:PORT, e.g. "
                         "http://10.0.0.1:8265 (ray://, host:port and 'auto' are not job server addresses)")
    return value.rstrip("/")



# ----------------------------------------------------------------------------------------------
#                                     Talking to the cluster
# ----------------------------------------------------------------------------------------------

def auth_headers() -> dict[str, str]:
    """Ray's token authentication (on by default since Ray 2.5x): the cluster's token, from
    $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (where `ray start` and
    `ray get-auth-token` keep it). Sent as the standard Authorization header: the job server reads
    that one first, and with it present Ray's client does not add the token it cached for this
    process (which, after any earlier ray.init here, may belong to another cluster)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
        if os.path.isfile(path):
            with open(path) as handle:
                token = handle.read().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str):
    """A JobSubmissionClient for `address`, or ClusterUnreachable naming the address."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError as err:
        raise ClusterUnreachable(f"the Ray job server at {address} refused us: {str(err).splitlines()[0]}. Copy the "
                                 "cluster's token (`ray get-auth-token` on the head node) into RAY_AUTH_TOKEN") from None
    except (ConnectionError, RuntimeError, OSError) as err:
        raise ClusterUnreachable(f"cannot reach the Ray job server at {address}: {err}. Is the head node up, "
                                 "and is its dashboard listening there (ray start --head --dashboard-host ...)?") from None


def dashboard_job_url(address: str, job_id: str) -> str:
    return f"{address}/#/jobs/{job_id}"


def cluster_ray_version(client) -> str | None:
    """The Ray version of the cluster, from the dashboard's /api/version."""
    try:
        response = client._do_request("GET", "/api/version")
        if response.status_code == 200:
            return response.json().get("ray_version")
    except Exception:  # an older or proxied dashboard: the version is only a pre-flight check
        return None
    return None


def run_name_filter(run_name: str) -> str:
    """An MLflow filter string matching runs tagged dip.run_name == run_name, or a superset of them.

    MLflow's filter grammar has no escape character: a value is quoted with whichever quote it does
    not contain; one holding both is matched with LIKE, every quote, backslash and wildcard in it
    replaced by the one-character wildcard (the caller keeps only exact matches)."""
    if "'" not in run_name:
        return f"tags.`dip.run_name` = '{run_name}'"
    if '"' not in run_name:
        return f'tags.`dip.run_name` = "{run_name}"'
    return "tags.`dip.run_name` LIKE '" + re.sub(r"""['"\\%_]""", "_", run_name) + "'"


def find_run_id(client, experiment_id: str, run_name: str) -> str | None:
    """The newest MLflow run of `run_name` in the experiment."""
    runs = client.search_runs([experiment_id], filter_string=run_name_filter(run_name),
                              order_by=["attributes.start_time DESC"], max_results=100)
    exact = [r for r in runs if r.data.tags.get("dip.run_name") == run_name]
    return exact[0].info.run_id if exact else None


@dataclass
class MlflowLink:
    text: str                 # what to print
    run_id: str | None = None


def mlflow_link(tracking_uri: str, experiment: str, run_name: str) -> MlflowLink:
    """The best link we can give: the run's page when it exists, else the experiment's page. A
    sqlite/file store lives on the head node, so we say where it is and how to open it."""
    if not tracking_uri.startswith(("http://", "https://")):
        return MlflowLink(f"{tracking_uri} (on the head node; open it there with "
                          f"`mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1`)")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    base = tracking_uri.rstrip("/")
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return MlflowLink(f"{base} (experiment {experiment!r} is created when the job starts)")
        run_id = find_run_id(client, found.experiment_id, run_name)
        if run_id:
            return MlflowLink(f"{base}/#/experiments/{found.experiment_id}/runs/{run_id}", run_id)
        return MlflowLink(f"{base}/#/experiments/{found.experiment_id} (run {run_name!r} appears when the job starts; "
                          "`dip jobs status ID` prints its own link)")
    except Exception as err:  # the tracking server is the job's business; never block a submission on it
        return MlflowLink(f"{base} (not reachable from here: {type(err).__name__})")


# ----------------------------------------------------------------------------------------------
#                                            Submit
# ----------------------------------------------------------------------------------------------

@dataclass
class SubmitResult:
    job_id: str
    address: str
    dashboard_url: str
    mlflow: MlflowLink
    entrypoint: str
    runtime_env: dict
    run_name: str
    checkpoints: str



def submit(request: SubmitRequest) -> SubmitResult:
    """Validate, connect, submit. Raises ValueError / FileNotFoundError / ClusterUnreachable before
    anything is submitted."""
    cfg, entrypoint, runtime_env, metadata = prepare(request)
    address = resolve_address(request.address)
    client = connect(address)
    ray_pin = exact_pins(read_dependencies(os.path.join(request.project_root, "pyproject.toml"))).get("ray")
    cluster_ray = cluster_ray_version(client)
    if ray_pin and cluster_ray and cluster_ray != ray_pin:
        raise ValueError(f"the cluster at {address} runs Ray {cluster_ray}, this project pins ray=={ray_pin}: "
                         "start the cluster from an image built with pyproject.toml")
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=request.submission_id or new_submission_id(cfg.run_name),
                               metadata=metadata,
                               entrypoint_num_cpus=0)  # the driver is light; keep every CPU for the workers
    return SubmitResult(job_id=job_id, address=address, dashboard_url=dashboard_job_url(address, job_id),
                        mlflow=mlflow_link(metadata["dip.tracking_uri"], cfg.tracking.experiment, cfg.run_name),
                        entrypoint=entrypoint, runtime_env=runtime_env, run_name=cfg.run_name,
                        checkpoints=metadata["dip.checkpoints"])


# ----------------------------------------------------------------------------------------------
#                                            Jobs
# ----------------------------------------------------------------------------------------------

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _status_name(status) -> str:
    return str(getattr(status, "value", status))


@dataclass
class JobView:
    job_id: str
    status: str
    entrypoint: str
    message: str
    start_time: float | None
    end_time: float | None
    metadata: dict

    @classmethod
    def from_details(cls, details) -> "JobView":
        def seconds(ms):
            return ms / 1000.0 if ms else None

        return cls(job_id=details.submission_id or details.job_id or "?", status=_status_name(details.status),
                   entrypoint=details.entrypoint or "", message=details.message or "",
                   start_time=seconds(details.start_time), end_time=seconds(details.end_time),
                   metadata=dict(details.metadata or {}))

    @property
    def run_name(self) -> str:
        return self.metadata.get("dip.run_name", "")


def list_jobs(address: str | None) -> list[JobView]:
    address = resolve_address(address)
    jobs = [JobView.from_details(d) for d in connect(address).list_jobs()]
    return sorted(jobs, key=lambda j: j.start_time or 0.0, reverse=True)


def job_status(address: str | None, job_id: str) -> tuple[str, JobView]:
    address = resolve_address(address)
    client = connect(address)
    try:
        details = client.get_job_info(job_id)
    except RuntimeError as err:
        raise ValueError(f"no job {job_id!r} on {address}: {err}") from None
    return address, JobView.from_details(details)


def job_logs(address: str | None, job_id: str) -> str:
    address = resolve_address(address)
    try:
        return connect(address).get_job_logs(job_id)
    except RuntimeError as err:
        raise ValueError(f"no logs for job {job_id!r} on {address}: {err}") from None


def follow_logs(address: str | None, job_id: str, write=None) -> str:
    """Stream the logs until the job ends; returns the job's final status."""
    import asyncio

    address = resolve_address(address)
    client = connect(address)
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(stream())
    except RuntimeError as err:
        raise ValueError(f"cannot follow job {job_id!r} on {address}: {err}") from None
    return _status_name(client.get_job_status(job_id))


def stop_job(address: str | None, job_id: str, wait_s: float = 0.0) -> str:
    """Ask Ray to stop the job (SIGTERM to the driver: it checkpoints, then exits); optionally wait
    for a terminal status. Returns the last status seen."""
    address = resolve_address(address)
    client = connect(address)
    try:
        client.stop_job(job_id)
    except RuntimeError as err:
        raise ValueError(f"cannot stop job {job_id!r} on {address}: {err}") from None
    deadline = time.monotonic() + wait_s
    status = _status_name(client.get_job_status(job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
        status = _status_name(client.get_job_status(job_id))
    return status

