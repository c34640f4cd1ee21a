"""Suite-wide test environment: DeepSpeed on CPU, fast Ray Train reports, no network, no usage stats."""
import os

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
# starts last and becomes the suite's tail (serial minutes on the 2-core machine, 2026-12-01).
LONGEST_FIRST = ("test_multinode_kill.py",      # ~6
                 "test_multinode_elastic.py",   # ~5.5
                 "test_trainer_faults.py",      # ~6
                 "test_eval_pool.py",           # ~3.5
                 "test_ablation_smoke.py")      # ~2


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _reference_run(tmp_path_factory, stage: int):
    """The uninterrupted run of TINY at one ZeRO stage, with its sample ledger (ledger/ in its run dir).
    Uses the module's Ray cluster when one is up, else its own, shut down again before the caller
    starts another."""
    import ray

    from cluster.driver.launch import launch
    from tests.test_trainer_support import tiny_config

    root = tmp_path_factory.mktemp(f"reference-zero{stage}")
    ledger = root / "ledger"
    ledger.mkdir()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, _node_ip_address="127.0.0.1",
                 log_to_driver=True)
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
