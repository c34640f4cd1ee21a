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


def _grow_policy(store, capacity: list[int], timeout_s: float):
    """cluster/driver/elastic.py's policy with Ray's capacity lookup (the AutoscalingCoordinator, an actor)
    replaced by `capacity[0]` workers; everything else is Ray's ElasticScalingPolicy."""
    from ray.train import ScalingConfig

    from cluster.driver.elastic import checkpoint_before_grow_policy

    scaling = ScalingConfig(num_workers=(1, 2), elastic_resize_monitor_interval_s=0)
    policy = checkpoint_before_grow_policy(scaling, store.root, timeout_s=timeout_s, poll_s=0)
    policy._maybe_send_resource_request = lambda: None
    policy._get_reserved_resources = lambda: "reserved"
    policy._count_possible_workers = lambda reserved: capacity[0]
    return policy


def test_a_grow_of_a_running_group_waits_for_the_workers_checkpoint_without_blocking_the_controller(tmp_path):
    """The policy answers every controller iteration at once: "no change" until the workers' checkpoint for
    its request is committed, then Ray's grow; a group that fails meanwhile withdraws the request."""
    import time
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    from trainer.checkpoint.store import CheckpointStore

    store = CheckpointStore(str(tmp_path / "checkpoints"))
    store.commit(4, {}, {})  # a periodic checkpoint: not the answer to a request
    capacity = [2]
    policy = _grow_policy(store, capacity, timeout_s=1800)
    group = SimpleNamespace(num_workers=1, start_time=0.0)

    def iteration():
        began = time.monotonic()
        decision = policy.make_decision_for_running_worker_group(group, None)
        assert time.monotonic() - began < 1.0  # never waits inside the controller
        return decision

    assert isinstance(iteration(), NoopDecision)  # capacity for 2: ask first
    request = store.resize_request()
    assert request["to_workers"] == 2
    assert isinstance(iteration(), NoopDecision)  # no answer yet
    store.commit(6, {}, {})
    assert store.answer_resize(request["id"], 6)
    decision = iteration()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2
    assert not store.resize_requested()  # withdrawn: the restarted group must not see it
    assert store.resize_outcome(request["id"]) == "grow"  # the workers wait for Ray's restart

    # a worker dies while the policy waits: Ray's failure handling moves the controller on, the request goes
    assert isinstance(iteration(), NoopDecision)
    request = store.resize_request()
    policy.after_controller_state_update(RunningState(), RunningState())
    assert store.resize_requested()  # a healthy group's iteration keeps it
    policy.after_controller_state_update(RunningState(), RestartingState(training_failed_error=None))
    assert not store.resize_requested() and policy.pending is None
    assert not store.answer_resize(request["id"], 7)  # the dying rank 0's late answer recreates nothing
    assert store.resize_request() is None

    # the capacity went away while the workers checkpointed: Ray decides again, no grow
    assert isinstance(iteration(), NoopDecision)
    store.commit(8, {}, {})
    request = store.resize_request()
    store.answer_resize(request["id"], 8)
    capacity[0] = 1
    assert isinstance(iteration(), NoopDecision) and not store.resize_requested()
    assert store.resize_outcome(request["id"]) == "no-grow"  # the workers train on at once, no grace wait

    # no answer in time: the request is withdrawn and Ray grows from the last checkpoint
    capacity[0] = 2
    slow = _grow_policy(store, capacity, timeout_s=0.3)
    assert isinstance(slow.make_decision_for_running_worker_group(group, None), NoopDecision)
    assert store.resize_requested()
    time.sleep(0.4)
    decision = slow.make_decision_for_running_worker_group(group, None)
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2 and not store.resize_requested()


def test_an_elastic_run_hands_ray_a_range_and_its_controller_the_grow_hook(tmp_path):
    """What cluster.driver.fit.build_trainer gives Ray Train: ScalingConfig(num_workers=(min, max)) with the
    resize interval, and the grow-checkpointing scaling policy for its controller (elastic runs only)."""
    from cluster.driver.fit import build_trainer
    from cluster.driver.prepare import PreparedRun, run_paths
    from cluster.driver.resume import ResumePlan
    from trainer.checkpoint.store import CheckpointStore

    cfg = _cfg("cluster.num_workers=[1,2]", "cluster.resize_check_s=7", f"output_dir={tmp_path}")
    paths = run_paths(cfg)
    trainer = build_trainer(PreparedRun(cfg, cfg, paths, CheckpointStore(paths.checkpoint_uri), ResumePlan()), "id")
    assert trainer.scaling_config.num_workers == (1, 2)
    assert trainer.scaling_config.elastic_resize_monitor_interval_s == 7
    policy = trainer.scaling_policy()  # what the trainer hands its controller in place of Ray's own
    assert type(policy).__name__ == "CheckpointBeforeGrow"
    assert policy.scaling_config is trainer.scaling_config and policy.checkpoint_uri == paths.checkpoint_uri
    fixed = _cfg(f"output_dir={tmp_path}")
    plain = build_trainer(PreparedRun(fixed, fixed, paths, CheckpointStore(paths.checkpoint_uri), ResumePlan()), "id")
    assert plain.scaling_config.num_workers == 2
    assert not hasattr(plain, "scaling_policy") and type(plain).__name__ == "TorchTrainer"
