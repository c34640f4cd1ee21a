"""Non-finite training steps (trainer/loop/nonfinite.py), with a poisoned batch (DIP_FAULT_NAN_AT) on 2 ranks.

* At the loop's level (the real TrainingRun and DeepSpeed on gloo, no Ray): a step whose batch is NaN
  on rank 1 only is skipped on both ranks, and changes nothing, on either: module weights, the fp32
  master weights, Adam's moments and step count, the LR, the EMA. The next clean step updates again.
* A real run (Ray, MLflow): two poisoned steps in a row roll back to the last committed checkpoint,
  rewind the step count and skip the data since it; poisoned again after a second window, the run stops
  FAILED with a clear error and its last committed checkpoint intact.
"""
from __future__ import annotations

import os

import pytest

from tests.data_helpers import run_ranks
from tests.goodput_checks import final_goodput
from tests.test_trainer_support import TINY, metric_history, ray_cluster, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def _local_state(run) -> dict:
    """Every tensor a step may change on this rank: the module's weights, the optimizer's own (fp32
    master) parameters and their Adam state, the LR, and the EMA this rank keeps."""
    import torch

    engine = run.engine
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):  # DeepSpeed's wrappers hold the torch AdamW
        optimizer = optimizer.optimizer
    # ZeRO-3: this rank's partition (ds_tensor); what `param` shows is a gather that comes and goes
    out = {f"module.{name}": getattr(p, "ds_tensor", p).detach().float().clone()
           for name, p in engine.module.named_parameters()}
    # keyed by the parameters AdamW steps: this rank's flat fp32 partitions under ZeRO (ZeRO-3 hands them
    # to AdamW only during its step), the module's own parameters under ZeRO-0
    for i, (param, state) in enumerate(optimizer.state.items()):
        out[f"master.{i}"] = param.detach().clone()
        out.update({f"adam.{i}.{key}": torch.as_tensor(value).detach().clone() for key, value in state.items()})
    out["lr"] = torch.tensor(engine.get_lr())
    ema = run.ema  # trainer.loop.training_ema: ZeRO-3 shards on every rank, else the whole EMA on rank 0
    weights = ema.shards if hasattr(ema, "shards") else ema.ema.module.state_dict() if ema.ema is not None else {}
    out.update({f"ema.{name}": t.detach().clone() for name, t in weights.items()})
    out["ema.num_updates"] = torch.tensor(ema.num_updates)
    return out


def _skip_one_poisoned_step(rank: int, world: int, configs: list[dict], store_dir: str) -> list[dict]:
    """For each config: steps 1-3 of the real loop, where step 2's batch is NaN on rank 1 only
    (DIP_FAULT_NAN_AT=2:1). One pair of processes for all configs."""
    import torch

    from trainer.config import config_from_dict
    from trainer.loop.run import TrainingRun, WorkerContext

    def changed(a: dict, b: dict) -> list[str]:
        return sorted(k for k in a if not torch.equal(a[k], b[k]))  # NaN != NaN: a NaN anywhere counts

    results = []
    for index, cfg_dict in enumerate(configs):
        checkpoints = os.path.join(store_dir, str(index))
        run = TrainingRun(config_from_dict(cfg_dict), WorkerContext(checkpoints, store_dir, "", ""), rank, world)
        run.setup()
        applied, states = [], []
        for _ in range(3):
            _, _, ok = run.train_step()
            run.progress.step += 1
            applied.append(ok)
            states.append(_local_state(run))
        run.checkpoints.close()
        run.loader.close()
        results.append({"applied": applied, "changed_by_skipped": changed(states[0], states[1]),
                        "changed_by_next": changed(states[1], states[2]), "skipped_steps": run.engine.skipped_steps})
    return results


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data import prepare_dataset
    from trainer.config import config_from_dict

    return prepare_dataset(config_from_dict(TINY).data, str(tmp_path_factory.mktemp("nonfinite-data"))).path


def test_a_step_poisoned_on_one_rank_is_skipped_on_both_and_changes_nothing(shards, tmp_path, monkeypatch):
    """ZeRO-2 fp32 and ZeRO-1/2/3 bf16: DeepSpeed's own overflow path (under bf16 its check_grad_overflow,
    which trainer.loop.engine sets); ZeRO-0 fp32: the guard's (trainer.loop.nonfinite.guard_plain_optimizer)."""
    monkeypatch.setenv("DIP_FAULT_NAN_AT", "2:1")
    setups = [(2, "fp32"), (0, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16")]
    configs = [{**TINY, "data": {**TINY["data"], "path": shards},
                "train": {**TINY["train"], "zero_stage": stage, "precision": precision}} for stage, precision in setups]
    ranks = run_ranks(_skip_one_poisoned_step, 2, configs, str(tmp_path), timeout_s=600)
    for rank, results in enumerate(ranks):
        for (stage, precision), got in zip(setups, results):
            where = f"ZeRO-{stage} {precision}, rank {rank}"
            assert got["applied"] == [True, False, True] and got["skipped_steps"] == 1, where
            assert got["changed_by_skipped"] == [], f"{where}: the skipped step changed {got['changed_by_skipped']}"
            # the clean step after it trains again: weights and Adam state move (so the check above can fail)
            assert any(k.startswith("adam.") for k in got["changed_by_next"]), where
            assert any(k.startswith("master.") for k in got["changed_by_next"]), where
            assert "ema.num_updates" in got["changed_by_next"], where
            if rank == 0 or stage == 3:  # the EMA's weights: rank 0's whole copy, or every rank's ZeRO-3 piece
                assert any(k.startswith("ema.") and k != "ema.num_updates" for k in got["changed_by_next"]), where


def test_poisoned_steps_roll_back_skip_their_data_and_repeated_rollbacks_fail_the_run(tmp_path, monkeypatch,
                                                                                     ray_cluster):  # noqa: F811
    """K=2, one rollback allowed, checkpoints every 4 steps; rank 1's global batches 5-6 of the data stream
    are NaN, then from batch 11 on. Steps 5, 6 are skipped -> rollback 1 to step-4, the step count rewound
    with it and the data of batches 5-6 skipped: steps 5-8 train batches 7-10 and step-8 is committed; steps
    9, 10 (batches 11, 12) are skipped -> a second rollback is one too many: FAILED, step-8 kept."""
    from mlflow.tracking import MlflowClient

    from cluster.cli.main import TrainingFailed
    from cluster.driver.launch import launch
    from cluster.driver.prepare import run_paths
    from trainer.checkpoint.manager import load_train_state
    from trainer.checkpoint.store import CheckpointStore
    from trainer.faults import read_ledger

    ledger = tmp_path / "ledger"
    ledger.mkdir()
    monkeypatch.setenv("DIP_FAULT_NAN_AT", "5-6,11-16:1")
    monkeypatch.setenv("DIP_FAULT_SAMPLE_LEDGER", str(ledger))
    cfg = tiny_config(tmp_path, "diverges", ["train.max_steps=16", "train.nonfinite_patience=2",
                                             "train.max_rollbacks=1"])
    with pytest.raises(TrainingFailed) as failed:
        launch(cfg)
    store = CheckpointStore(run_paths(cfg).checkpoint_uri)
    assert str(failed.value) == (
        "training diverged: 2 non-finite steps in a row (steps 9..10) after 1 rollback(s) (train.max_rollbacks=1); "
        f"the last good checkpoint is {store.display(8)}; re-running the same command resumes from it. Lower "
        "optim.lr, set optim.grad_clip, or look at the data of those steps")
    assert store.steps() == [4, 8] and store.latest_committed(deep=True) == 8  # nothing written after the streak
    state = load_train_state(store, 8)
    # step-8 holds 8 kept steps (their samples), the run totals, and the 2 discarded steps of the data stream
    assert (state["step"], state["samples_seen"], state["discarded_steps"]) == (8, 8 * 4, 2)
    assert (state["nonfinite_steps"], state["rollbacks"], state["launch_rollbacks"]) == (2, 1, 1)

    # steps 5 and 6 ran twice (rewound), every batch of the data stream once on each rank, and no sample
    # was trained twice: the rollback to step 4 did not replay batches 5-6 (the ledger's step and data_step
    # are the ones before the optimizer step)
    entries = read_ledger(str(ledger))
    for rank in (0, 1):
        mine = [e for e in entries if e["rank"] == rank]
        assert sorted(e["step"] + 1 for e in mine) == sorted([*range(1, 7), *range(5, 11)])
        assert sorted(e["data_step"] + 1 for e in mine) == list(range(1, 13))
    keys = [key for e in entries for key in e["keys"]]
    assert len(keys) == 12 * 4 and len(set(keys)) == len(keys)  # 48 images: one epoch, each once

    run_id = state["mlflow_run_id"]
    client = MlflowClient(run_paths(cfg).tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    tracking = run_paths(cfg).tracking_uri
    assert metric_history(tracking, run_id, "nonfinite_steps") == {5: [1], 6: [2], 9: [3], 10: [4]}
    assert metric_history(tracking, run_id, "rollbacks") == {6: [1]}
    assert sorted(metric_history(tracking, run_id)) == [1, 2, 3, 4, 5, 6, 7, 8]  # no NaN loss logged
    # samples_seen counts kept steps: step 5 logged twice with the same count (step 6's first interval ended
    # in the rollback, step 10's in the failure: neither logged)
    seen = {step: sorted(values) for step, values in metric_history(tracking, run_id, "samples_seen").items()}
    assert seen == {s: [4.0 * s] * (2 if s == 5 else 1) for s in range(1, 10)}
    assert run.data.tags["rollback.1"] == (f"step 6: 2 non-finite steps in a row (steps 5..6): rolled back to "
                                           f"{store.display(4)} and skipped the data of steps 5..6 (8 samples)")
    # goodput: steps 5, 6, 9, 10 skipped are lost work (nothing applied lay between step-4 and the streak, so
    # the rollback discarded no trained step); the kept steps 1-8 count
    goodput, _metrics, _tags = final_goodput(tracking, run_id)
    assert (goodput["productive_steps"], goodput["lost_steps"], goodput["failures"]) == (8, 4, 0)
    assert goodput["badput_s"]["lost_work"] > 0.0 and goodput["badput_s"]["recovery"] > 0.0  # the restore
