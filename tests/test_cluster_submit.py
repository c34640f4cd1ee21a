"""`dip submit` / `dip jobs`: everything that must be caught before a job is created, and the job it builds.

The end-to-end path (a real multi-node cluster, real jobs) is in tests/test_multinode_kill.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from cluster import ray_jobs
from cluster import submit as sub
from cluster.cli.main import main as dip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart_cpu.yaml")


def _closed_port_address() -> str:
    from tests.test_multinode_support import free_port

    return f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there


def test_address_comes_from_the_flag_or_ray_address_and_must_be_a_job_server_url(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="no cluster address"):
        ray_jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265/")
    assert ray_jobs.resolve_address(None) == "http://10.0.0.1:8265"
    assert ray_jobs.resolve_address("https://head.example:443") == "https://head.example:443"
    for bad in ("ray://10.0.0.1:10001", "10.0.0.1:6379", "auto", "http://"):
        with pytest.raises(ValueError, match="not a job server URL"):
            ray_jobs.resolve_address(bad)


def test_pins_are_read_from_pyproject_and_compared_with_installed_versions(tmp_path):
    requirements = sub.read_dependencies()
    pins = sub.exact_pins(requirements)
    assert pins["torch"] == "2.14.1" and pins["ray"] == "2.60.0" and pins["deepspeed"] == "0.19.8"
    assert "pillow" not in pins  # unpinned requirements are not checked
    installed = {"torch": "2.14.1+cu130", "ray": "2.59.0"}
    problems = sub.pin_mismatches({"torch": "2.14.1", "ray": "2.60.0", "mlflow": "3.17.2"}, installed.get)
    assert problems == ["mlflow==3.17.2 is not installed", "ray==2.60.0 is pinned, 2.59.0 is installed"]
    # this venv is built from the pins: the real check passes; a wrong pin fails it
    assert sub.check_pins() == 0
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\nname = "x"\ndependencies = ["numpy==0.0.1"]\n')
    assert sub.check_pins(str(fake)) == 1


def test_env_pairs_are_validated():
    assert sub.parse_env(["A=1", "B_2=x=y"]) == {"A": "1", "B_2": "x=y"}
    for bad in ("NOVALUE", "1BAD=x", "=x"):
        with pytest.raises(ValueError, match="--env"):
            sub.parse_env([bad])


def test_the_job_ships_the_project_and_pins_its_dependencies():
    image = sub.build_runtime_env("image", {"X": "1"}, 120)
    assert image["working_dir"] == REPO
    assert {".venv", ".git", "runs", "mlruns", "__pycache__"} <= set(image["excludes"])
    assert image["env_vars"] == {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "120", "X": "1"}
    assert "pip" not in image
    pip = sub.build_runtime_env("pip", {}, 300)
    packages = pip["pip"]["packages"]
    assert "torch==2.14.1" in packages and "deepspeed==0.19.8" in packages
    assert not any(p.startswith("ray") for p in packages), "the cluster's own Ray must never be reinstalled"
    with pytest.raises(ValueError, match="--deps"):
        sub.build_runtime_env("conda", {}, 0)
    entry = sub.build_entrypoint("configs/quickstart_cpu.yaml", ["run_name=a b"], "image")
    assert entry == "python -m cluster.submit --check-pins && python -m cluster.cli train configs/quickstart_cpu.yaml 'run_name=a b'"


def test_prepare_refuses_configs_that_would_lose_their_outputs_or_cannot_be_shipped(tmp_path):
    # the quickstart writes to runs/ (relative): inside the job's temporary copy of the project
    with pytest.raises(ValueError, match="output_dir='runs' is relative"):
        sub.prepare(sub.SubmitRequest(QUICKSTART))
    with pytest.raises(ValueError, match="checkpoint.path='ck' is relative"):
        sub.prepare(sub.SubmitRequest(QUICKSTART, [f"output_dir={tmp_path}", "checkpoint.path=ck"]))
    outside = tmp_path / "mine.yaml"
    shutil.copy(QUICKSTART, outside)
    with pytest.raises(ValueError, match="outside the project directory"):
        sub.prepare(sub.SubmitRequest(str(outside), [f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="optim.lr"):
        sub.prepare(sub.SubmitRequest(QUICKSTART, [f"output_dir={tmp_path}", "optim.lr=-1"]))
    with pytest.raises(FileNotFoundError):
        sub.prepare(sub.SubmitRequest(os.path.join(REPO, "configs", "nope.yaml")))


def test_prepare_attaches_the_driver_to_the_cluster_and_records_where_things_go(tmp_path):
    cfg, entrypoint, runtime_env, metadata = sub.prepare(
        sub.SubmitRequest(QUICKSTART, [f"output_dir={tmp_path}", "run_name=r1", "checkpoint.path=s3://b/ck"]))
    assert cfg.run_name == "r1"
    assert entrypoint.endswith(f"train configs/quickstart_cpu.yaml output_dir={tmp_path} run_name=r1 "
                               "checkpoint.path=s3://b/ck cluster.address=auto")
    assert metadata["dip.checkpoints"] == "s3://b/ck/r1"
    assert metadata["dip.tracking_uri"] == f"sqlite:///{tmp_path}/r1/mlflow.db"
    assert all(isinstance(v, str) for v in metadata.values())  # Ray job metadata is str -> str


def test_an_unreachable_cluster_is_reported_before_anything_is_submitted(tmp_path, capsys):
    address = _closed_port_address()
    with pytest.raises(ray_jobs.ClusterUnreachable, match=f"cannot reach the Ray job server at {address}"):
        ray_jobs.submit(sub.SubmitRequest(QUICKSTART, [f"output_dir={tmp_path}"], address=address))
    assert dip(["submit", QUICKSTART, f"output_dir={tmp_path}", "--address", address]) == 2
    assert "cannot reach the Ray job server" in capsys.readouterr().err
    # a bad config is reported even before the cluster is contacted
    assert dip(["submit", QUICKSTART, f"output_dir={tmp_path}", "model.name=DiP-XXL/16", "--address", address]) == 2
    assert "model.name='DiP-XXL/16'" in capsys.readouterr().err
    assert dip(["jobs", "list", "--address", address]) == 2
    assert "dip jobs: error: cannot reach the Ray job server" in capsys.readouterr().err
    assert dip(["jobs", "status", "dip-x", "--address", "not-a-url"]) == 2
    assert "not a job server URL" in capsys.readouterr().err


def test_dry_run_prints_the_job_without_a_cluster(tmp_path, capsys):
    assert dip(["submit", QUICKSTART, f"output_dir={tmp_path}", "--deps", "pip", "--env", "OMP_NUM_THREADS=1",
                "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "python -m cluster.cli train configs/quickstart_cpu.yaml" in out and "'torch==2.14.1'" in out
    assert "OMP_NUM_THREADS" in out


def test_auth_token_comes_from_the_environment_or_the_token_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert ray_jobs.auth_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text("def\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert ray_jobs.auth_headers() == {"Authorization": "Bearer def"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_jobs.auth_headers() == {}


def test_our_token_wins_over_the_one_ray_cached_for_this_process(tmp_path):
    """CI regression: after a ray.init in the same process, Ray's client added the token it had
    cached (another cluster's) as Authorization, which the job server reads before anything else.
    Checked in a fresh process: Ray reads the auth mode once, at import."""
    probe = (
        "from cluster import ray_jobs\n"
        "from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled\n"
        "ray_would_add = get_auth_headers_if_auth_enabled(ray_jobs.auth_headers())\n"
        "ray_alone = get_auth_headers_if_auth_enabled({})\n"
        "assert ray_alone, 'token auth is not on in the probe: the check below would prove nothing'\n"
        "assert ray_would_add == {}, ray_would_add\n"
    )
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="ours", HOME=str(tmp_path), PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_mlflow_link_for_a_head_node_store_says_how_to_open_it():
    link = ray_jobs.mlflow_link("sqlite:////shared/runs/r1/mlflow.db", "dip", "r1")
    assert "mlflow ui --backend-store-uri sqlite:////shared/runs/r1/mlflow.db" in link.text
    unreachable = ray_jobs.mlflow_link(_closed_port_address(), "dip", "r1")
    assert "not reachable" in unreachable.text and unreachable.run_id is None


def test_dry_run_redacts_credentials_and_warns_about_secret_env(tmp_path, capsys):
    assert dip(["submit", QUICKSTART, f"output_dir={tmp_path}", "tracking.uri=http://alice:hunter2@127.0.0.1:5000",
                "--env", "AWS_SECRET_ACCESS_KEY=topsecret", "--env", "MLFLOW_TRACKING_PASSWORD=pw-2",
                "--env", "HF_TOKEN=hf-3", "--env", "OMP_NUM_THREADS=1", "--env", "TOKENIZERS_PARALLELISM=false",
                "--dry-run"]) == 0
    captured = capsys.readouterr()
    for secret in ("topsecret", "pw-2", "hf-3", "hunter2"):
        assert secret not in captured.out + captured.err
    assert "'AWS_SECRET_ACCESS_KEY': '<redacted>'" in captured.out and "alice:<redacted>@127.0.0.1" in captured.out
    assert "'OMP_NUM_THREADS': '1'" in captured.out and "'TOKENIZERS_PARALLELISM': 'false'" in captured.out
    warnings = [line for line in captured.err.splitlines() if "looks like a credential" in line]
    assert len(warnings) == 3 and "--env AWS_SECRET_ACCESS_KEY" in warnings[0]


def test_workers_never_get_credentials_from_the_driver(monkeypatch):
    from cluster.driver.ray_start import worker_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-test")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"  # where the store is: not a secret
    assert not [name for name in env if sub.is_secret_name(name)], env
    assert not {"AKIA-test", "secret-test", "token-test"} & set(env.values())


def test_run_names_with_quotes_find_their_own_mlflow_run(tmp_path):
    """MLflow's filter grammar has no escapes: a quote in run_name must neither break the search nor
    match another run (run_name allows any character but '/')."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("dip", artifact_location=(tmp_path / "artifacts").as_uri())
    names = ["plain", "bob's run", 'say "hi"', "both ' and \"", "x' OR tags.a = 'y", "50%_done\\"]
    runs = {name: client.create_run(experiment, tags={"dip.run_name": name}).info.run_id for name in names}
    client.create_run(experiment, tags={"dip.run_name": "both _ and _"})  # what a wildcard would also match
    for name in names:
        assert ray_jobs.find_run_id(client, experiment, name) == runs[name], name
    assert ray_jobs.find_run_id(client, experiment, "absent") is None
