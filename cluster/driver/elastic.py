"""Elastic runs: Ray Train's resizing, with a checkpoint before every grow.

A run with `cluster.num_workers: [min, max]` hands Ray Train `ScalingConfig(num_workers=(min, max))`.
Ray starts as many workers as fit (at least min); when a worker or its node dies it restarts the
group with the workers that still fit (a FailureConfig retry), and while the group is healthy it
checks every `cluster.resize_check_s` whether more would fit now, and if so restarts it bigger.
Every restart resumes from the newest committed checkpoint on the new world size
(trainer.checkpoint.manager.CheckpointManager).

A shrink follows a loss, so the steps since the last checkpoint are lost once, as with any crash. A
grow is Ray's decision on a healthy group, and Ray's restart would throw those steps away a second
time. So the grow decision itself is deferred until the workers have a checkpoint: `CheckpointBeforeGrow`
is Ray's own ElasticScalingPolicy with one change. When the policy would grow a running group it asks
the workers (a resize request in the checkpoint store, like a stop request) to commit a checkpoint at
their next stop check and answers "no change" for now; at each later controller iteration (every
health check) it looks for their answer, without waiting, and only once the checkpoint is committed
(or `checkpoint.commit_timeout_s` passed) does it hand Ray the grow, re-decided on the capacity of that
moment. Ray's controller keeps polling the workers all the while, so a worker that dies meanwhile is
handled like any failure (FailureConfig), and the policy withdraws its request as soon as the group
leaves RUNNING, so a restarted group never sees it.

The policy reaches into Ray Train internals (its scaling policy classes, and the trainer's controller
start-up, where the policy is handed over): with a Ray outside the tested pin
(trainer/checkpoint/pins.py) the run uses Ray's plain policy and a grow restarts from the last
periodic checkpoint (the documented safe path), with a warning.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from trainer.checkpoint.pins import mismatch

log = logging.getLogger("dip.elastic")

FEATURE = "elastic checkpoint before grow"


@dataclass
class PendingGrow:
    """A grow deferred until the workers answer request `request_id` (or `deadline`, monotonic)."""
    request_id: str
    to_workers: int
    deadline: float
    asked_at: float


def checkpoint_before_grow_policy(scaling_config, checkpoint_uri: str, timeout_s: float, poll_s: float = 0.5):
    """Ray's ElasticScalingPolicy that defers every grow of a running group until the workers committed
    a checkpoint for it (see the module docstring); None with an untested Ray (Ray's plain policy then)."""
    reason = mismatch(FEATURE)
    if reason is not None:
        log.warning("elastic: %s: a grow restarts from the last periodic checkpoint", reason)
        return None
    from ray.train.v2._internal.execution.controller.state import RunningState
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy

    class CheckpointBeforeGrow(ElasticScalingPolicy):
        def __init__(self):
            super().__init__(scaling_config)
            self.checkpoint_uri, self.timeout_s, self.poll_s = checkpoint_uri, timeout_s, poll_s
            self.pending: PendingGrow | None = None
            self._store = None
            self._last_look = float("-inf")

        @property
        def store(self):
            if self._store is None:  # opened in the controller's process, not pickled with the policy
                from trainer.checkpoint.store import CheckpointStore

                self._store = CheckpointStore(self.checkpoint_uri)
            return self._store

        # -- Ray's scaling-policy interface: called once per controller iteration of a healthy group --
        def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
            if self.pending is not None:
                if not self._grow_may_go():
                    return NoopDecision()
                decision = self._decide_now(worker_group_state, worker_group_status)
                self.withdraw("grow" if isinstance(decision, ResizeDecision) else "no-grow")
                return decision
            decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
            if isinstance(decision, ResizeDecision) and decision.num_workers > worker_group_state.num_workers:
                self.ask(decision.num_workers)
                return NoopDecision()
            return decision

        def _decide_now(self, worker_group_state, worker_group_status):
            """Ray's decision on the capacity of this moment (the one that called for the grow may be stale)."""
            self._latest_monitor_time = float("-inf")  # Ray's policy: decide now, not after another interval
            decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
            if not isinstance(decision, ResizeDecision):
                log.warning("elastic: the capacity for the grow is gone again: the group goes on at %d workers",
                            worker_group_state.num_workers)
            return decision

        # -- the controller's state updates (this policy is one of its callbacks) ----------------------
        def after_controller_state_update(self, previous_state, current_state) -> None:
            super().after_controller_state_update(previous_state, current_state)
            if self.pending is not None and not isinstance(current_state, RunningState):
                # a failure, a preemption, the end: nobody is left to answer, a restarted group must not see it
                log.warning("elastic: the group left RUNNING (%s) while a checkpoint for the grow was pending: "
                            "request withdrawn", type(current_state).__name__)
                self.withdraw()

        def before_controller_abort(self):
            self.withdraw()
            return super().before_controller_abort()

        async def before_controller_shutdown(self):
            self.withdraw()
            return await super().before_controller_shutdown()

        # -- the request ------------------------------------------------------------------------------
        def ask(self, to_workers: int) -> None:
            request_id = self.store.request_resize(to_workers, expires_in_s=self.timeout_s)
            now = time.monotonic()
            self.pending = PendingGrow(request_id, to_workers, now + self.timeout_s, now)
            log.warning("elastic: capacity for %d workers: asking the workers for a checkpoint before the resize",
                        to_workers)

        def _grow_may_go(self) -> bool:
            """True once the workers' checkpoint for the request is committed, or the request timed out;
            looks at the store at most every poll_s (this runs every controller iteration)."""
            now = time.monotonic()
            if now - self._last_look < self.poll_s and now < self.pending.deadline:
                return False
            self._last_look = now
            step = self.store.resize_checkpoint(self.pending.request_id)
            if step is not None and self.store.verify(step).ok:
                log.warning("elastic: checkpoint %s committed %.1f s after the request: resizing to %d workers",
                            self.store.display(step), now - self.pending.asked_at, self.pending.to_workers)
            elif now < self.pending.deadline:
                return False
            else:
                log.warning("elastic: no checkpoint within %.0f s: resizing from the last one", self.timeout_s)
            return True

        def withdraw(self, outcome: str | None = None) -> None:
            """Delete the request; `outcome` tells the waiting workers whether Ray's restart is coming."""
            if self.pending is not None:
                self.store.withdraw_resize_request(self.pending.request_id, outcome)
                self.pending = None

    return CheckpointBeforeGrow()


def trainer_with_policy(trainer_cls, make_policy):
    """`trainer_cls` (Ray's TorchTrainer) whose controller gets make_policy(scaling_config) as its scaling
    policy when that is not None. Ray 2.60 builds the policy in DataParallelTrainer.fit and hands it to
    _initialize_and_run_controller(scaling_policy=...) (an internal: guarded by the pin of FEATURE)."""

    class TrainerWithPolicy(trainer_cls):
        def scaling_policy(self):
            return make_policy(self.scaling_config)

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            policy = self.scaling_policy()
            if policy is not None:
                controller_init_kwargs["scaling_policy"] = policy
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    TrainerWithPolicy.__name__ = TrainerWithPolicy.__qualname__ = f"{trainer_cls.__name__}WithPolicy"
    return TrainerWithPolicy
