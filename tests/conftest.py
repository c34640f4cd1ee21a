"""Suite-wide test environment: DeepSpeed on CPU, fast Ray Train reports, no network, no usage stats."""
import os
import pathlib

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# `make test` runs the files on two xdist workers (--dist loadfile --no-loadscope-reorder), each file
# whole on one worker, in collection order: the files of several minutes go first, so that none of them
# starts last and becomes the suite's tail (serial minutes on the 2-core machine, 2026-12-01, before the
# SIGKILL matrix lost ZeRO-1 and the eval pool half its samples: test_trainer_faults and test_eval_pool
# are shorter now).
LONGEST_FIRST = ("test_multinode_kill.py",      # ~6   } one work unit: one worker, one after the
                 "test_multinode_elastic.py",   # ~5.5 }   other (MultiNodeTogether below)
                 "test_trainer_faults.py",      # ~6
                 "test_eval_pool.py",           # ~3.5
                 "test_ablation_smoke.py")      # ~2
MULTINODE_PREFIX = "test_multinode_"
# A directory that keeps the session references (below) between pytest sessions, for re-running one slow
# file while working on it; unset (the default, and in `make test`), each session computes its own.
KEEP_REFERENCES_ENV = "DIP_TEST_KEEP_REFERENCES"


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error when it is not loaded (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, except that every tests/test_multinode_*.py file is in one work unit: the files
    that each start a Ray cluster of several nodes run on one worker, one after the other, never side by
    side (two such clusters at once on 2 cores drove the load to 15 and a job past its timeouts)."""
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own scheduler for any other --dist
    from xdist.scheduler import LoadFileScheduling

    class MultiNodeTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return MULTINODE_PREFIX if os.path.basename(path).startswith(MULTINODE_PREFIX) else path

    return MultiNodeTogether(config, log)


def _reference_run(tmp_path_factory, stage: int):
    """The uninterrupted run of TINY at one ZeRO stage, with its sample ledger (ledger/ in its run dir).

    Computed once per `make test`, not once per xdist worker: the first worker to need it computes it
    in the directory all workers share (under a file lock; the others wait on the lock, which leaves
    them the CPUs) and records its summary beside it; the tests only read it (or copy it). Uses the
    module's Ray cluster when one is up, else its own, shut down again before the caller starts another."""
    import dataclasses
    import json

    from filelock import FileLock

    from cluster.driver.launch import RunSummary

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N/, the parent of every worker's popen-gwK/
    if os.environ.get(KEEP_REFERENCES_ENV):  # opt-in, across sessions: delete it when the trainer changes
        shared = pathlib.Path(os.environ[KEEP_REFERENCES_ENV])
        shared.mkdir(parents=True, exist_ok=True)
    summary_file = shared / f"reference-zero{stage}.json"
    with FileLock(str(shared / f"reference-zero{stage}.lock")):
        if not summary_file.exists():
            result = _compute_reference_run(shared / f"reference-zero{stage}", stage)
            summary_file.write_text(json.dumps({**dataclasses.asdict(result), "ledger": result.ledger}))
    fields = json.loads(summary_file.read_text())
    ledger = fields.pop("ledger")
    result = RunSummary(**fields)
    result.ledger = ledger
    assert result.status == "FINISHED"
    return result


def _compute_reference_run(root, stage: int):
    import ray

    from cluster.driver.launch import launch
    from tests.test_trainer_support import tiny_config

    ledger = root / "ledger"
    ledger.mkdir(parents=True)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        from tests.test_trainer_support import start_local_ray

        start_local_ray()
    os.environ["DIP_FAULT_SAMPLE_LEDGER"] = str(ledger)
    try:
        result = launch(tiny_config(root, f"ref{stage}", [f"train.zero_stage={stage}"]))
    finally:
        os.environ.pop("DIP_FAULT_SAMPLE_LEDGER", None)
        if owns_ray:
            ray.shutdown()
    assert result.status == "FINISHED"
    result.ledger = str(ledger)
    return result


@pytest.fixture(scope="session")
def zero2_reference(tmp_path_factory):
    """The uninterrupted ZeRO-2 run of TINY, computed once per session and shared by every test that
    compares against it (the trainer kill tests and the multi-node tests): a run of this config that
    is killed and resumed, on any cluster layout, must end bit-identical to it."""
    return _reference_run(tmp_path_factory, 2)


@pytest.fixture(scope="session")
def zero3_reference(tmp_path_factory):
    """The same for ZeRO-3 (the trainer kill tests and the elastic multi-node test)."""
    return _reference_run(tmp_path_factory, 3)


@pytest.fixture
def mlflow_reads_from(monkeypatch):
    """Point MLflow's process-wide tracking URI (what `models:/...` URIs resolve against) at a store for
    one test, as a user would, and set back what was there after: an earlier test of the same xdist
    worker may have set it, and the environment variable alone does not override that."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # MLflow 3.17 refuses pickles otherwise

    def point_at(uri: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)

    yield point_at
    mlflow.set_tracking_uri(previous)
