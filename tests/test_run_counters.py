"""The run's counters stay exact across restarts and rollbacks (trainer.checkpoint.manager.TrainProgress,
trainer.loop.recovery, the restore's dealing of corrupt_samples).

* Units: what a rollback keeps and rewinds, the rollback budget per `dip train` invocation, how the
  corrupt-sample counts of the saved ranks are dealt to the new ranks.
* Real TrainingRuns on plain gloo ranks (DeepSpeed on CPU, DiP-T/16, no Ray):
  - a rollback rewinds the step count with the LR schedule: the step after a rollback to step-C is C+1,
    its LR the uninterrupted run's at that step, the run ends after train.max_steps kept steps; a step dir
    left from before the rollback is removed, not written over;
  - the rollback budget survives a process restart of the same invocation, and a new invocation gets its own;
  - a resume at another world size counts one resize however often it is repeated from the same
    checkpoint; corrupt_samples summed over the ranks stays the run's total on any world size.
"""
from __future__ import annotations

import os

import pytest

from tests.data_helpers import run_ranks
from tests.test_trainer_support import TINY


# ----------------------------------------------------------------------------------------------
#                                             units
# ----------------------------------------------------------------------------------------------
def test_a_rollback_rewinds_step_and_samples_and_keeps_the_run_totals():
    from trainer.loop.recovery import rolled_back

    before = {"step": 7, "samples_seen": 28, "last_loss": 0.5, "resizes": 1, "nonfinite_steps": 5, "rollbacks": 2,
              "discarded_steps": 3, "launch": "b", "launch_rollbacks": 1, "goodput": {"as_of": 6}}
    restored = {**before, "step": 4, "samples_seen": 16, "nonfinite_steps": 1, "rollbacks": 1, "discarded_steps": 0,
                "launch": "a", "launch_rollbacks": 0, "resizes": 0, "goodput": {"as_of": 4}}
    after = rolled_back(before, restored)
    # the goodput ledger is the checkpoint's: the loop counts what came after it as lost work
    assert after == {"step": 4, "samples_seen": 16, "last_loss": 0.5, "resizes": 1, "nonfinite_steps": 5,
                     "rollbacks": 3, "discarded_steps": 6, "launch": "b", "launch_rollbacks": 2,
                     "goodput": {"as_of": 4}}


def test_the_rollback_budget_is_kept_within_an_invocation_and_fresh_for_a_new_one():
    from trainer.checkpoint.manager import TrainProgress

    saved = TrainProgress(step=8, samples_seen=32, rollbacks=3, launch="first", launch_rollbacks=2).state_dict()
    restarted = TrainProgress()
    restarted.load_state_dict(saved)
    restarted.begin_launch("first")  # Ray restarted the worker group: same invocation
    assert (restarted.launch_rollbacks, restarted.rollbacks) == (2, 3)
    rerun = TrainProgress()
    rerun.load_state_dict(saved)
    rerun.begin_launch("second")     # `dip train` run again after it failed
    assert (rerun.launch, rerun.launch_rollbacks, rerun.rollbacks) == ("second", 0, 3)


def test_a_checkpoint_from_before_the_new_counters_loads_with_them_at_zero():
    from trainer.checkpoint.manager import TrainProgress

    progress = TrainProgress()
    progress.load_state_dict({"step": 4, "samples_seen": 16, "last_loss": None, "resizes": 1, "nonfinite_steps": 0,
                              "rollbacks": 1})
    assert (progress.step, progress.data_step, progress.rollbacks, progress.launch_rollbacks) == (4, 4, 1, 0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_restored_corrupt_counts_sum_to_the_saved_total_on_any_world_size(world_size):
    from trainer.checkpoint.manager import dealt_corrupt_samples

    saved = [{"data": {"corrupt_samples": 3}}, {"data": {"corrupt_samples": 5}}, {"data": {}}]
    assert sum(dealt_corrupt_samples(saved, rank) for rank in range(world_size)) == 8


# ----------------------------------------------------------------------------------------------
#                                  real runs on gloo ranks
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data import prepare_dataset
    from trainer.config import config_from_dict

    return prepare_dataset(config_from_dict(TINY).data, str(tmp_path_factory.mktemp("counters-data"))).path


def _config(shards: str, **train) -> dict:
    # warmup over the whole run: the LR differs at every step, so a step number off by one shows
    return {**TINY, "data": {**TINY["data"], "path": shards}, "optim": {**TINY["optim"], "warmup_steps": 20},
            "train": {**TINY["train"], "nonfinite_patience": 2, "max_rollbacks": 1, **train},
            "checkpoint": {**TINY["checkpoint"], "every_steps": 2, "keep": 10}, "samples": {**TINY["samples"],
                                                                                             "steps": 1}}


def _traced_run(cfg_dict: dict, checkpoints: str, run_dir: str, rank: int, world: int, poison: str,
                launch_id: str = "", junk_at: int | None = None) -> dict:
    """One whole TrainingRun.run(); records (step before, applied, LR after) of every optimizer step.
    junk_at: while the first streak runs, a stray file is put into step dir `junk_at` (work from before the
    rollback that a later save of that step must not mix with)."""
    from trainer.checkpoint.manager import load_train_state
    from trainer.checkpoint.store import step_name
    from trainer.config import config_from_dict
    from trainer.loop.run import TrainingRun, WorkerContext

    os.environ["DIP_FAULT_NAN_AT"] = poison
    run = TrainingRun(config_from_dict(cfg_dict), WorkerContext(checkpoints, run_dir, "", "", launch_id=launch_id),
                      rank, world)
    run.setup()
    trace, train_step = [], run.train_step

    def traced():
        before = run.progress.step
        outcome = train_step()
        trace.append((before, outcome.applied, float(run.engine.get_lr()[0])))
        if junk_at is not None and not outcome.applied and rank == 0:
            os.makedirs(os.path.join(checkpoints, step_name(junk_at)), exist_ok=True)
            open(os.path.join(checkpoints, step_name(junk_at), "stray.pt"), "w").close()
        return outcome

    run.train_step = traced
    summary = run.run()
    state = load_train_state(run.store, run.store.latest_committed(deep=True))
    return {"trace": trace, "summary": summary, "steps": run.store.steps(),
            "state": {k: state[k] for k in ("step", "samples_seen", "discarded_steps", "rollbacks",
                                            "launch_rollbacks", "nonfinite_steps")},
            "stray": [s for s in run.store.steps() if os.path.exists(os.path.join(checkpoints, step_name(s),
                                                                                  "stray.pt"))]}


def _rollback_and_clean_runs(rank: int, world: int, shards: str, root: str) -> dict:
    cfg = _config(shards, max_steps=6)
    clean = _traced_run(cfg, os.path.join(root, "clean"), root, rank, world, poison="")
    # data batches 3-4 NaN: steps 3, 4 skipped -> rollback to step-2; steps 3-6 train batches 5-8
    rolled = _traced_run(cfg, os.path.join(root, "rolled"), root, rank, world, poison="3-4:*", junk_at=4)
    return {"clean": clean, "rolled": rolled}


def _restarted_runs(rank: int, world: int, shards: str, root: str) -> dict:
    """A later start from the rolled run's step-6 with batches 9-10 NaN (steps 7, 8): the same invocation has
    used its one rollback; a new one rolls back and finishes."""
    cfg = _config(shards, max_steps=10)
    same = _traced_run(cfg, os.path.join(root, "rolled"), root, rank, world, poison="3-4,9-10:*")
    rerun = _traced_run(cfg, os.path.join(root, "rolled"), root, rank, world, poison="3-4,9-10:*",
                        launch_id="a re-run")
    return {"same": same, "rerun": rerun}


slow = pytest.mark.slow  # the real runs; the units above are quick


@slow
def test_a_rollback_rewinds_the_step_count_and_its_budget_survives_a_restart(shards, tmp_path):
    root = str(tmp_path)
    [first] = run_ranks(_rollback_and_clean_runs, 1, shards, root, timeout_s=600)
    clean, rolled = first["clean"], first["rolled"]
    assert [(step, applied) for step, applied, _ in clean["trace"]] == [(s, True) for s in range(6)]
    assert [(step, applied) for step, applied, _ in rolled["trace"]] == [
        (0, True), (1, True), (2, False), (3, False), (2, True), (3, True), (4, True), (5, True)]
    clean_lr = {step: lr for step, _, lr in clean["trace"]}
    kept = [(step, lr) for step, applied, lr in rolled["trace"] if applied]
    assert [lr for _, lr in kept] == [clean_lr[step] for step, _ in kept]  # the uninterrupted schedule
    assert len(set(clean_lr.values())) == 6  # (warmup: every step's LR differs, so an offset step shows)
    assert (rolled["summary"]["step"], rolled["summary"]["samples_seen"], rolled["summary"]["rollbacks"],
            rolled["summary"]["nonfinite_steps"]) == (6, 6 * 4, 1, 2)
    assert rolled["steps"] == [2, 4, 6] and rolled["stray"] == []  # step-4 from before the rollback removed
    assert rolled["state"] == {"step": 6, "samples_seen": 24, "discarded_steps": 2, "rollbacks": 1,
                               "launch_rollbacks": 1, "nonfinite_steps": 2}

    [second] = run_ranks(_restarted_runs, 1, shards, root, timeout_s=600)
    same, rerun = second["same"], second["rerun"]
    assert same["summary"]["failed"].startswith(
        "training diverged: 2 non-finite steps in a row (steps 7..8) after 1 rollback(s) (train.max_rollbacks=1)")
    assert [(step, applied) for step, applied, _ in same["trace"]] == [(6, False), (7, False)]
    assert rerun["summary"]["failed"] == "" and rerun["summary"]["step"] == 10
    assert [(step, applied) for step, applied, _ in rerun["trace"]] == [
        (6, False), (7, False), (6, True), (7, True), (8, True), (9, True)]
    assert rerun["state"] == {"step": 10, "samples_seen": 40, "discarded_steps": 4, "rollbacks": 2,
                              "launch_rollbacks": 1, "nonfinite_steps": 4}


def _open_run(cfg_dict: dict, checkpoints: str, rank: int, world: int):
    from trainer.config import config_from_dict
    from trainer.loop.run import TrainingRun, WorkerContext

    run = TrainingRun(config_from_dict(cfg_dict), WorkerContext(checkpoints, checkpoints, "", ""), rank, world)
    run.setup()
    return run


def _counters(run) -> dict:
    """The run's resizes (this rank's progress) and corrupt_samples as the reporter sums it over the ranks."""
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(run.loader.corrupt_samples)], dtype=torch.float64)
    dist.all_reduce(total)
    return {"resizes": run.progress.resizes, "corrupt": int(total.item()), "step": run.progress.step}


def _shut(run) -> None:
    """The run's end without a save (a crash before the next checkpoint loses nothing else)."""
    run.checkpoints.close()
    run.reporter.close()
    run.loader.close()


def _two_ranks_save(rank: int, world: int, cfg_dict: dict, checkpoints: str) -> dict:
    run = _open_run(cfg_dict, checkpoints, rank, world)
    # the loader's own count of skipped samples: 3 on rank 0, 5 on rank 1
    run.loader._count_corrupt([f"bad-{rank}-{i}" for i in range(3 + 2 * rank)])
    run.train_step()
    run.progress.step += 1
    run.save_checkpoint()
    counted = _counters(run)
    _shut(run)
    return counted


def _one_rank_restarts(rank: int, world: int, cfg_dict: dict, checkpoints: str) -> list[dict]:
    seen = []
    for _ in range(2):  # resumed from the 2-rank step-1, a step trained, "crashed" before the next save
        run = _open_run(cfg_dict, checkpoints, rank, world)
        seen.append(_counters(run))
        run.train_step()
        _shut(run)
    run = _open_run(cfg_dict, checkpoints, rank, world)  # a third time: this one saves step-2 on 1 rank
    run.train_step()
    run.progress.step += 1
    run.save_checkpoint()
    _shut(run)
    run = _open_run(cfg_dict, checkpoints, rank, world)  # resumed on the world size that wrote it
    seen.append(_counters(run))
    _shut(run)
    return seen


def _two_ranks_resume(rank: int, world: int, cfg_dict: dict, checkpoints: str) -> dict:
    run = _open_run(cfg_dict, checkpoints, rank, world)
    counted = _counters(run)
    _shut(run)
    return counted


@slow
def test_a_resize_counts_once_and_corrupt_samples_stay_the_runs_total(shards, tmp_path):
    cfg = _config(shards, max_steps=4)
    checkpoints = str(tmp_path / "checkpoints")
    saved = run_ranks(_two_ranks_save, 2, cfg, checkpoints, timeout_s=600)
    assert [c["corrupt"] for c in saved] == [8, 8]
    [seen] = run_ranks(_one_rank_restarts, 1, cfg, checkpoints, timeout_s=600)
    # 2 -> 1 worker, resumed twice from the same step-1: one resize; rank 0's 3 corrupt samples + rank 1's 5
    assert seen == [{"resizes": 1, "corrupt": 8, "step": 1}, {"resizes": 1, "corrupt": 8, "step": 1},
                    {"resizes": 1, "corrupt": 8, "step": 2}]
    grown = run_ranks(_two_ranks_resume, 2, cfg, checkpoints, timeout_s=600)
    assert grown == [{"resizes": 2, "corrupt": 8, "step": 2}] * 2  # 1 -> 2 workers: the second resize
