"""Run `dip train` on a running Ray cluster as a Ray Job, and manage those jobs (Ray Jobs SDK).

`dip submit` checks everything it can before it submits: the config loads and validates, it
lives inside the project directory that is shipped, its outputs do not land in the job's
throw-away working directory, and the cluster's job server answers. Only then is the job created.

The job's runtime_env ships this checkout as `working_dir` (minus virtualenvs, runs and caches)
and pins the dependencies in one of two ways (`--deps`):

* `image` (default): the cluster's Python already has the stack (a container image or a shared
  virtualenv built from pyproject.toml; torch alone is 5.5 GB, too much to install per job). The
  entrypoint first runs `python -m cluster.submit --check-pins`, which fails the job at once, with
  the list of differences, if any installed version differs from a pin in pyproject.toml.
* `pip`: Ray installs the pinned list from pyproject.toml into a per-job virtualenv on every node
  (cached by Ray across jobs with the same list). Ray itself is never in that list: the cluster's
  Ray must be the pinned one already, and `dip submit` checks it.

This module builds the job without a cluster (checks, runtime_env, entrypoint, metadata) and is the
`python -m cluster.submit --check-pins` entry point; cluster/ray_jobs.py holds every call to the
cluster's job server (submit, list, status, logs, stop) and the links printed for a job.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPS_MODES = ("image", "pip")
# Never shipped: environments, outputs, caches, VCS data (Ray's working_dir limit is 500 MiB).
WORKING_DIR_EXCLUDES = [".venv", "venv", ".git", "runs", "mlruns", "mlflow.db", "quickstart_out", ".pytest_cache",
                        "__pycache__", "*.egg-info", ".whl", ".gl", "*.pt", "*.ckpt", "*.npz"]
# Seconds Ray gives the driver between SIGTERM (`dip jobs stop`) and SIGKILL: our driver uses them to
# ask the workers for a final committed checkpoint (cluster/driver/signals.py StopOnSignal).
DEFAULT_STOP_GRACE_S = 300
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Environment names whose values are credentials (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN, HF_TOKEN, ...)
_SECRET_NAME = re.compile(r"SECRET|PASSW|CREDENTIAL|PRIVATE|APIKEY|(^|_)(TOKEN|KEY|AUTH)($|_)", re.I)
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*):[^/@\s]*@")   # scheme://user:password@host
REDACTED = "<redacted>"
CREDENTIALS_DOC = "docs/cluster.md, 'Credentials'"


# ----------------------------------------------------------------------------------------------
#                                            Pins
# ----------------------------------------------------------------------------------------------

def read_dependencies(pyproject: str | None = None) -> list[str]:
    """The `[project] dependencies` of pyproject.toml, as written (pinned where pinned)."""
    import tomllib

    path = pyproject or os.path.join(PROJECT_ROOT, "pyproject.toml")
    with open(path, "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].strip()


def exact_pins(requirements: list[str]) -> dict[str, str]:
    """{"torch": "2.14.1", "ray": "2.60.0", ...} for the `name==version` requirements."""
    pins = {}
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*$", requirement)
        if match:
            pins[match.group(1)] = match.group(3)
    return pins


def pin_mismatches(pins: dict[str, str], installed=None) -> list[str]:
    """Human-readable differences between `pins` and this Python's installed distributions."""
    from importlib import metadata

    def version_of(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    lookup = installed or version_of
    problems = []
    for name, wanted in sorted(pins.items()):
        found = lookup(name)
        if found is None:
            problems.append(f"{name}=={wanted} is not installed")
        elif found.split("+", 1)[0] != wanted.split("+", 1)[0]:  # a local build tag (+cu130) is the same release
            problems.append(f"{name}=={wanted} is pinned, {found} is installed")
    return problems


def check_pins(pyproject: str | None = None) -> int:
    """Entry point of `python -m cluster.submit --check-pins` (the first command of an image-mode job)."""
    problems = pin_mismatches(exact_pins(read_dependencies(pyproject)))
    if problems:
        print("dip: this cluster's Python does not match the pins in pyproject.toml:\n  " + "\n  ".join(problems)
              + f"\n  (python: {sys.executable}). Rebuild the image from pyproject.toml, or submit with --deps pip.",
              file=sys.stderr)
        return 1
    print(f"dip: the cluster's Python matches every pin in pyproject.toml ({sys.executable})")
    return 0


# ----------------------------------------------------------------------------------------------
#                                      Building the job
# ----------------------------------------------------------------------------------------------

def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ValueError(f"--env {pair!r} is not valid: expected NAME=VALUE with NAME like MY_VAR")
        env[name] = value
    return env


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact(value):
    """A copy fit to print: values of secret-looking keys replaced, passwords inside URLs hidden."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and is_secret_name(k) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", value)
    return value


def secret_env_warnings(env: dict[str, str]) -> list[str]:
    """--env entries that carry credentials: Ray shows a job's runtime_env in its dashboard and keeps it."""
    return [f"--env {name} looks like a credential: Ray shows a job's environment in its dashboard and stores it "
            f"with the job; give the nodes their credentials instead ({CREDENTIALS_DOC})"
            for name in sorted(env) if is_secret_name(name)]


def relative_config_path(config_path: str, project_root: str = PROJECT_ROOT) -> str:
    """The config's path inside the shipped directory (the job runs from a copy of it)."""
    absolute = os.path.realpath(config_path)
    root = os.path.realpath(project_root)
    if os.path.commonpath([absolute, root]) != root:
        raise ValueError(f"config {config_path!r} is outside the project directory {root}, which is what is "
                         "shipped to the cluster: copy it under configs/ and submit that copy")
    return os.path.relpath(absolute, root)


def cluster_overrides(cfg, overrides: list[str]) -> list[str]:
    """Overrides the job needs on top of the user's: the driver must attach to the cluster it runs on."""
    extra = []
    if not cfg.cluster.address:
        extra.append("cluster.address=auto")  # "" would start a second, private Ray inside the job
    return [*overrides, *extra]


def storage_problems(cfg) -> list[str]:
    """Config choices that would lose the run on a cluster: relative paths resolve inside the job's
    temporary copy of the project, which is deleted when the job ends."""
    problems = []
    if not os.path.isabs(cfg.output_dir):
        problems.append(f"output_dir={cfg.output_dir!r} is relative: the run directory (config, samples, the "
                        "embedded MLflow store) would live in the job's temporary working directory; set an "
                        "absolute path on shared storage, e.g. output_dir=/shared/runs")
    path = cfg.checkpoint.path
    if path and "://" not in path and not os.path.isabs(path):
        problems.append(f"checkpoint.path={path!r} is relative: use an absolute shared path or s3://bucket/prefix")
    data_path = cfg.data.path
    if data_path != "synthetic" and "://" not in data_path and not os.path.isabs(data_path):
        problems.append(f"data.path={data_path!r} is relative: use an absolute path every node can read, "
                        "or s3://bucket/prefix")
    return problems


def build_runtime_env(deps: str, env_vars: dict[str, str], stop_grace_s: int,
                      project_root: str = PROJECT_ROOT) -> dict:
    if deps not in DEPS_MODES:
        raise ValueError(f"--deps={deps!r} is not valid: choose one of {list(DEPS_MODES)}")
    env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s)), **env_vars}
    runtime_env: dict = {"working_dir": project_root, "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env}
    if deps == "pip":
        packages = [r for r in read_dependencies(os.path.join(project_root, "pyproject.toml"))
                    if _requirement_name(r) != "ray"]  # the cluster's own Ray must not be replaced
        runtime_env["pip"] = {"packages": packages, "pip_check": False}
    return runtime_env


def build_entrypoint(config_rel: str, overrides: list[str], deps: str) -> str:
    train = shlex.join(["python", "-m", "cluster.cli", "train", config_rel, *overrides])
    if deps == "image":
        return f"python -m cluster.submit --check-pins && {train}"
    return train


def new_submission_id(run_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name)[:40]
    return f"dip-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


# ----------------------------------------------------------------------------------------------
#                                            Submit
# ----------------------------------------------------------------------------------------------

@dataclass
class SubmitRequest:
    config: str
    overrides: list[str] = field(default_factory=list)
    address: str | None = None
    deps: str = "image"
    env: dict[str, str] = field(default_factory=dict)
    submission_id: str | None = None
    stop_grace_s: int = DEFAULT_STOP_GRACE_S
    project_root: str = PROJECT_ROOT

    def __post_init__(self):
        if self.deps not in DEPS_MODES:
            raise ValueError(f"--deps={self.deps!r} is not valid: choose one of {list(DEPS_MODES)}")
        if not isinstance(self.stop_grace_s, int) or self.stop_grace_s < 0:
            raise ValueError(f"--stop-grace-s={self.stop_grace_s!r} is not valid: expected an integer >= 0")
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"--env name {name!r} is not a valid environment variable name")



def prepare(request: SubmitRequest):
    """Every check that needs no cluster. Returns (cfg, entrypoint, runtime_env, metadata)."""
    from cluster.driver.prepare import run_paths
    from trainer.config import load_config

    cfg = load_config(request.config, request.overrides)
    config_rel = relative_config_path(request.config, request.project_root)
    overrides = cluster_overrides(cfg, list(request.overrides))
    problems = storage_problems(cfg)
    if problems:
        raise ValueError("this config would lose its outputs on a cluster: " + "; ".join(problems))
    entrypoint = build_entrypoint(config_rel, overrides, request.deps)
    runtime_env = build_runtime_env(request.deps, request.env, request.stop_grace_s, request.project_root)
    paths = run_paths(cfg)
    metadata = {"dip.run_name": cfg.run_name, "dip.config": config_rel, "dip.overrides": " ".join(overrides),
                "dip.tracking_uri": paths.tracking_uri, "dip.experiment": cfg.tracking.experiment,
                "dip.checkpoints": paths.checkpoint_uri}
    return cfg, entrypoint, runtime_env, metadata


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-pins"]:
        sys.exit(check_pins())
    print("usage: python -m cluster.submit --check-pins", file=sys.stderr)
    sys.exit(2)
