"""Elastic runs: Ray Train's resizing, with a checkpoint before every grow.

A run with `cluster.num_workers: [min, max]` hands Ray Train `ScalingConfig(num_workers=(min, max))`.
Ray starts as many workers as fit (at least min); when a worker or its node dies it restarts the
group with the workers that still fit (a FailureConfig retry), and while the group is healthy it
checks every `cluster.resize_check_s` whether more would fit now, and if so restarts it bigger.
Every restart resumes from the newest committed checkpoint on the new world size
(trainer.checkpoint.manager.CheckpointManager).

A shrink follows a loss, so the steps since the last checkpoint are lost once, as with any crash. A
grow is Ray's decision on a healthy group, and Ray's restart would throw those steps away a second
time: `CheckpointBeforeGrow` runs inside Ray Train's controller just before it executes the resize,
asks the workers (through the checkpoint store, like a stop request) to commit a checkpoint at their
next stop check, waits until they answer with its committed step (bounded), then lets Ray restart
the group from it.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("dip.elastic")


def _controller_callback() -> type | None:
    """Ray Train's controller hook interface (internal in Ray 2.60; Ray hands a RunConfig callback that
    is not a UserCallback to the controller as it is). None: another Ray, no pre-resize hook: a grow
    still works, it just restarts from the last periodic checkpoint."""
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError:
        return None
    return ControllerCallback


def checkpoint_before_grow(checkpoint_uri: str, timeout_s: float, poll_s: float = 0.5):
    """The callback instance for RunConfig(callbacks=[...]) (None without the hook interface); see the
    module docstring."""
    base = _controller_callback()
    if base is None:
        log.warning("elastic: this Ray has no controller hooks: a grow restarts from the last periodic checkpoint")
        return None

    class CheckpointBeforeGrow(base):
        def __init__(self):
            self.checkpoint_uri, self.timeout_s, self.poll_s = checkpoint_uri, timeout_s, poll_s
            self._running_group_resizes = False

        def after_controller_state_update(self, previous_state, current_state) -> None:
            # RUNNING -> RESIZING -> SCHEDULING is the elastic monitor resizing a healthy group; restarts
            # after a failure go RESTARTING -> SCHEDULING, with nobody left to write a checkpoint
            state = type(current_state).__name__
            if state == "ResizingState":
                self._running_group_resizes = True
            elif state != "SchedulingState":
                self._running_group_resizes = False

        def before_controller_execute_resize_decision(self, decision) -> None:
            if not self._running_group_resizes:
                return
            self._running_group_resizes = False
            self.checkpoint_now(decision.num_workers)

        def checkpoint_now(self, to_workers: int) -> int | None:
            """Ask for a checkpoint and wait until it is committed; returns its step (None: timed out)."""
            from trainer.checkpoint.store import CheckpointStore

            store = CheckpointStore(self.checkpoint_uri)
            store.request_resize(to_workers)
            log.warning("elastic: capacity for %d workers: asking the workers for a checkpoint before the resize",
                        to_workers)
            deadline = time.monotonic() + self.timeout_s
            try:
                while time.monotonic() < deadline:
                    step = store.resize_checkpoint()  # the workers' answer: the step they committed for it
                    if step is not None and store.verify(step).ok:
                        log.warning("elastic: checkpoint %s committed: resizing to %d workers", store.display(step),
                                    to_workers)
                        return step
                    time.sleep(self.poll_s)
                log.warning("elastic: no checkpoint within %.0f s: resizing from the last one", self.timeout_s)
                return None
            finally:
                store.clear_resize_request()

    return CheckpointBeforeGrow()
