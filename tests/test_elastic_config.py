"""Elastic configs: the worker range, the global batch it keeps, and the resume rule (pure logic)."""
import pytest

from tests.test_trainer_support import TINY
from trainer.config import config_from_dict, resume_incompatibilities, solve_batch_split, to_dict


def _cfg(*overrides: str):
    return config_from_dict(TINY, list(overrides))


def test_a_range_states_the_global_batch_at_its_top_and_splits_it_at_every_size():
    cfg = _cfg("cluster.num_workers=[1,4]", "data.batch_size=8", "train.grad_accum=2")
    assert cfg.cluster.elastic and (cfg.cluster.min_workers, cfg.cluster.max_workers) == (1, 4)
    assert cfg.global_batch == 8 * 4 * 2
    splits = {w: cfg.batch_split(w) for w in (1, 2, 4)}
    assert [(s.micro_batch, s.grad_accum) for s in splits.values()] == [(8, 8), (8, 4), (8, 2)]
    assert all(s.global_batch == 64 for s in splits.values())
    # 3 workers: 64 is no multiple of 3; inside the range it is named, at a restart it is refused
    assert cfg.unusable_worker_counts() == [3]
    assert "3 workers cannot keep it" in cfg.batch_arithmetic()
    with pytest.raises(ValueError, match=r"3 workers cannot keep the global batch 64 .*refusing to train"):
        cfg.batch_split(3)


def test_the_split_keeps_the_largest_micro_batch_that_fits_the_configured_one():
    assert solve_batch_split(48, 8, 4).micro_batch == 6 and solve_batch_split(48, 8, 4).grad_accum == 2
    assert solve_batch_split(16, 8, 1).micro_batch == 8 and solve_batch_split(16, 8, 1).grad_accum == 2
    assert solve_batch_split(16, 8, 3) is None


@pytest.mark.parametrize("value, message", [
    ("[3,2]", "expected \\[min, max\\] with min <= max"),
    ("[0,2]", "cluster.num_workers\\[0\\]=0 is not valid"),
    ("[1,2,3]", "cluster.num_workers=\\[1, 2, 3\\] is not valid"),
])
def test_a_bad_range_names_the_key(value, message):
    with pytest.raises(ValueError, match=message):
        _cfg(f"cluster.num_workers={value}")


def test_an_end_of_the_range_that_cannot_keep_the_global_batch_is_refused_at_load():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 workers; choose a minimum that divides 8"):
        _cfg("cluster.num_workers=[3,4]")  # 2 x 4 x 1 = 8 at the top
    assert _cfg("cluster.num_workers=[2,2]").cluster.num_workers == 2  # [n, n] is a fixed size


def test_resuming_on_another_world_size_is_fine_unless_the_global_batch_changes():
    saved = to_dict(_cfg())  # 2 x 2 workers x 1 = 4
    assert resume_incompatibilities(saved, _cfg("cluster.num_workers=1", "train.grad_accum=2")) == []
    assert resume_incompatibilities(saved, _cfg("cluster.num_workers=[1,2]")) == []
    problems = resume_incompatibilities(saved, _cfg("cluster.num_workers=4"))
    assert len(problems) == 1
    assert "the global batch was 4" in problems[0] and "now 8" in problems[0]
    assert "set data.batch_size=1 or cluster.num_workers=2" in problems[0]


def test_dip_plan_and_train_check_show_both_ends_of_the_range(capsys):
    from cluster.cli.main import main

    assert main(["plan", "configs/dip_xl16_256.yaml", "cluster.num_workers=[4,8]", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "elastic: 4 to 8 workers, global batch 256" in out
    assert "at 4 worker(s): micro-batch 32 x 4 workers x 2 accumulation = 256 images per step; ZeRO-2 needs" in out
    assert "at 8 worker(s): micro-batch 32 x 8 workers x 1 accumulation" in out
    assert main(["train", "configs/quickstart_cpu.yaml", "--check", "cluster.num_workers=[1,2]"]) == 0
    out = capsys.readouterr().out
    assert ("micro-batch 8 x 2 workers x 1 accumulation = 16 images per step at 2 workers; "
            "micro-batch 8 x 1 workers x 2 accumulation = 16 images per step at 1") in out


def test_a_grow_of_a_running_group_waits_for_the_workers_checkpoint_and_a_restart_does_not(tmp_path):
    """cluster/driver/elastic.py's controller hook, driven through Ray Train's real controller states; the workers'
    side (answering the request with a committed step) played by a thread."""
    import threading

    from ray.train.v2._internal.execution.controller.state import (ResizingState, RestartingState, RunningState,
                                                                  SchedulingState)
    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

    from cluster.driver.elastic import checkpoint_before_grow
    from trainer.checkpoint.store import CheckpointStore

    store = CheckpointStore(str(tmp_path / "checkpoints"))
    store.commit(4, {}, {})  # a periodic checkpoint: not the answer to a request
    hook = checkpoint_before_grow(store.root, timeout_s=30, poll_s=0.05)
    decision = ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1})

    def workers_answer():
        while not store.resize_requested():
            pass
        store.commit(6, {}, {})
        store.answer_resize(6)

    answering = threading.Thread(target=workers_answer)
    answering.start()
    hook.after_controller_state_update(RunningState(), ResizingState(decision))
    hook.after_controller_state_update(ResizingState(decision), SchedulingState(decision))
    hook.before_controller_execute_resize_decision(decision)  # blocks until step 6 is committed and answered
    answering.join(timeout=10)
    assert not store.resize_requested()  # cleared: the restarted group must not see it

    # a restart after a failure: nobody is left to checkpoint, the hook does not ask
    hook.after_controller_state_update(RunningState(), RestartingState(training_failed_error=None))
    hook.after_controller_state_update(RestartingState(training_failed_error=None), SchedulingState(decision))
    hook.before_controller_execute_resize_decision(decision)
    assert not store.resize_requested()

    # no answer in time: the request is withdrawn and Ray resizes from the last checkpoint
    slow = checkpoint_before_grow(store.root, timeout_s=0.3, poll_s=0.05)
    assert slow.checkpoint_now(2) is None and not store.resize_requested()


def test_an_elastic_run_hands_ray_a_range_and_its_controller_the_grow_hook(tmp_path):
    """What cluster.driver.fit.build_trainer gives Ray Train: ScalingConfig(num_workers=(min, max)) with the
    resize interval, and the hook among the callbacks Ray Train gives its controller as they are (a
    UserCallback would be wrapped in a handler that only forwards report/exception events)."""
    from cluster.driver.fit import build_trainer
    from cluster.driver.prepare import PreparedRun, run_paths
    from cluster.driver.resume import ResumePlan
    from trainer.checkpoint.store import CheckpointStore

    cfg = _cfg("cluster.num_workers=[1,2]", "cluster.resize_check_s=7", f"output_dir={tmp_path}")
    paths = run_paths(cfg)
    trainer = build_trainer(PreparedRun(cfg, cfg, paths, CheckpointStore(paths.checkpoint_uri), ResumePlan()), "id")
    assert trainer.scaling_config.num_workers == (1, 2)
    assert trainer.scaling_config.elastic_resize_monitor_interval_s == 7
    assert "CheckpointBeforeGrow" in [type(cb).__name__ for cb in trainer._create_default_callbacks()]
    fixed = _cfg(f"output_dir={tmp_path}")
    plain = build_trainer(PreparedRun(fixed, fixed, paths, CheckpointStore(paths.checkpoint_uri), ResumePlan()), "id")
    assert plain.scaling_config.num_workers == 2
    assert "CheckpointBeforeGrow" not in [type(cb).__name__ for cb in plain._create_default_callbacks()]
