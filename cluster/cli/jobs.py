"""`dip submit` and `dip jobs list|status|logs|stop`: parsing and printing; the job is built by
cluster/submit.py and every call to the cluster's job server is in cluster/ray_jobs.py.

Registration is cheap: ray, mlflow and torch are imported inside the handlers.
"""
from __future__ import annotations

import argparse
import sys
import time

from cluster.cli.options import add_config_arguments, add_job_server_address


def register(subparsers) -> None:
    _register_submit(subparsers)
    _register_jobs(subparsers)


# ----------------------------------------------------------------------------------------------
#                                           dip submit
# ----------------------------------------------------------------------------------------------

def _register_submit(subparsers) -> None:
    parser = subparsers.add_parser(
        "submit", help="run `dip train` on a Ray cluster as a Ray Job",
        description="Validate a training config and submit it to a running Ray cluster as a Ray Job. The job "
                    "ships this checkout (working_dir) and pins the dependencies; it resumes from the newest "
                    "committed checkpoint of its run_name, so submitting the same config again continues a run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  dip submit configs/dip_xl16_256.yaml --address http://10.0.0.1:8265 \\\n"
               "      output_dir=/shared/runs checkpoint.path=s3://my-bucket/dip data.path=s3://my-bucket/imagenet-256\n"
               "  dip submit configs/quickstart_cpu.yaml output_dir=/tmp/runs --deps pip --env OMP_NUM_THREADS=1")
    add_config_arguments(parser, "a YAML file inside this project (see configs/)")
    add_job_server_address(parser)
    parser.add_argument("--deps", choices=("image", "pip"), default="image",
                        help="image: the cluster's Python already has the pinned stack (checked when the job starts); "
                             "pip: Ray installs the pinned list from pyproject.toml into a per-job virtualenv")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the job's driver and workers (repeatable)")
    parser.add_argument("--job-id", default=None, help="the submission id (default: dip-<run_name>-<time>-<random>)")
    parser.add_argument("--stop-grace-s", type=int, default=None,
                        help="seconds `dip jobs stop` gives the run to write its final checkpoint (default 300)")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the job, submit nothing")
    parser.set_defaults(handler=run_submit)


def run_submit(args) -> int:
    from cluster import ray_jobs
    from cluster import submit as sub

    request = sub.SubmitRequest(config=args.config, overrides=list(args.overrides), address=args.address,
                                deps=args.deps, env=sub.parse_env(args.env), submission_id=args.job_id,
                                stop_grace_s=sub.DEFAULT_STOP_GRACE_S if args.stop_grace_s is None else args.stop_grace_s)
    for warning in sub.secret_env_warnings(request.env):
        print(f"dip submit: warning: {warning}", file=sys.stderr)
    if args.dry_run:  # printed with credentials redacted: this output ends up in terminals and CI logs
        cfg, entrypoint, runtime_env, metadata = sub.prepare(request)
        print(f"run        : {cfg.run_name} ({cfg.batch_arithmetic()})")
        print(f"entrypoint : {sub.redact(entrypoint)}")
        print(f"runtime_env: {sub.redact(runtime_env)}")
        print(f"checkpoints: {sub.redact(metadata['dip.checkpoints'])}")
        print(f"mlflow     : {sub.redact(metadata['dip.tracking_uri'])}")
        return 0
    try:
        result = ray_jobs.submit(request)
    except ray_jobs.ClusterUnreachable as err:
        print(f"dip submit: error: {err}", file=sys.stderr)
        return 2
    print(f"job id     : {result.job_id}")
    print(f"dashboard  : {result.dashboard_url}")
    print(f"mlflow     : {sub.redact(result.mlflow.text)}")
    print(f"checkpoints: {sub.redact(result.checkpoints)}")
    print(f"follow     : dip jobs logs {result.job_id} --follow --address {result.address}")
    return 0


# ----------------------------------------------------------------------------------------------
#                                            dip jobs
# ----------------------------------------------------------------------------------------------

def _register_jobs(subparsers) -> None:
    parser = subparsers.add_parser("jobs", help="list, inspect, follow or stop submitted jobs",
                                   description="Manage Ray Jobs submitted with `dip submit` (Ray Jobs SDK).")
    jobs = parser.add_subparsers(dest="jobs_command", metavar="ACTION")
    listing = jobs.add_parser("list", help="all jobs on the cluster, newest first")
    add_job_server_address(listing)
    listing.set_defaults(handler=run_jobs_list)
    status = jobs.add_parser("status", help="a job's status, dashboard link and MLflow run link")
    status.add_argument("job_id")
    add_job_server_address(status)
    status.set_defaults(handler=run_jobs_status)
    logs = jobs.add_parser("logs", help="a job's driver logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    add_job_server_address(logs)
    logs.set_defaults(handler=run_jobs_logs)
    stop = jobs.add_parser("stop", help="stop a job: the run writes a final checkpoint, then exits")
    stop.add_argument("job_id")
    stop.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait up to this long for the job to end")
    add_job_server_address(stop)
    stop.set_defaults(handler=run_jobs_stop)
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _connect_or_report(fn, *args):
    from cluster.ray_jobs import ClusterUnreachable

    try:
        return fn(*args), 0
    except ClusterUnreachable as err:
        print(f"dip jobs: error: {err}", file=sys.stderr)
        return None, 2


def run_jobs_list(args) -> int:
    from cluster.ray_jobs import list_jobs

    jobs, code = _connect_or_report(list_jobs, args.address)
    if code:
        return code
    if not jobs:
        print("no jobs")
        return 0
    width = max(len(j.job_id) for j in jobs)
    print(f"{'JOB ID':<{width}}  {'STATUS':<10} {'STARTED':<19}  RUN")
    for job in jobs:
        print(f"{job.job_id:<{width}}  {job.status:<10} {_when(job.start_time):<19}  {job.run_name or job.entrypoint[:60]}")
    return 0


def run_jobs_status(args) -> int:
    from cluster.ray_jobs import dashboard_job_url, job_status, mlflow_link

    found, code = _connect_or_report(job_status, args.address, args.job_id)
    if code:
        return code
    address, job = found
    print(f"job id    : {job.job_id}")
    print(f"status    : {job.status}" + (f" ({job.message})" if job.message else ""))
    print(f"started   : {_when(job.start_time)}")
    print(f"ended     : {_when(job.end_time)}")
    print(f"entrypoint: {job.entrypoint}")
    print(f"dashboard : {dashboard_job_url(address, job.job_id)}")
    if job.metadata.get("dip.tracking_uri"):
        link = mlflow_link(job.metadata["dip.tracking_uri"], job.metadata.get("dip.experiment", "dip"), job.run_name)
        print(f"mlflow    : {link.text}")
        print(f"checkpoint: {job.metadata.get('dip.checkpoints', '-')}")
    return 0


def run_jobs_logs(args) -> int:
    from cluster.ray_jobs import follow_logs, job_logs

    if args.follow:
        status, code = _connect_or_report(follow_logs, args.address, args.job_id)
        if code:
            return code
        print(f"\ndip jobs: job {args.job_id} {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    text, code = _connect_or_report(job_logs, args.address, args.job_id)
    if code:
        return code
    sys.stdout.write(text)
    return 0


def run_jobs_stop(args) -> int:
    from cluster.ray_jobs import stop_job

    status, code = _connect_or_report(stop_job, args.address, args.job_id, args.wait)
    if code:
        return code
    print(f"job {args.job_id}: {status}")
    return 0
