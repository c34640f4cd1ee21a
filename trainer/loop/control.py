"""When the loop stops early, agreed on every rank: a stop request from the driver, a Ray preemption
notice, or an elastic run about to grow (Ray restarts the group once the checkpoint for it is committed).

The driver asks through the checkpoint store (trainer.checkpoint.store: `dip train`'s signal handler
writes a stop request, cluster.driver.elastic a resize request); Ray Train tells every rank of a
preemption. Every `train.stop_check_every` steps the ranks agree on the strongest of these (an
all-reduce MAX of the flags below).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

log = logging.getLogger("dip.train")

STOP_NONE, STOP_RESIZE, STOP_REQUESTED, STOP_PREEMPTION = 0, 1, 2, 3  # agreed by MAX over ranks
# An elastic grow: after the checkpoint for it, the workers wait (instead of training steps the restart
# would throw away) while the controller waits for the commit, then for the restart it starts right after.
RESIZE_WAIT_S = 300.0
RESIZE_GRACE_S = 120.0


def in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context()
        return True
    except Exception:  # not inside a Ray Train worker (a plain torch.distributed launch)
        return False


class StopControl:
    """The stop checks of one rank (collective: every rank polls at the same steps), and the wait for
    Ray's restart after the checkpoint for an elastic grow."""

    def __init__(self, store, checkpoints, progress, device, *, is_main: bool, check_every: int, max_steps: int,
                 in_ray: bool):
        self.store, self.checkpoints, self.progress, self.device = store, checkpoints, progress, device
        self.is_main, self.check_every, self.max_steps, self.in_ray = is_main, check_every, max_steps, in_ray
        self.preemption_saved = False  # one checkpoint per preemption notice, then training goes on
        self.resize_request_id = None   # the elastic grow request rank 0 saw, answered by its id

    def poll(self) -> int:
        """The agreed stop flag at a check step (every train.stop_check_every), STOP_NONE between them."""
        return self.check() if self.progress.step % self.check_every == 0 else STOP_NONE

    def check(self) -> int:
        """Agreed across ranks: a stop request from the driver, a Ray preemption notice, or an elastic
        run about to grow."""
        flag = STOP_NONE
        if self.is_main and self.store.stop_requested():
            flag = STOP_REQUESTED
        elif self.is_main and (resize := self.store.resize_request()) is not None:
            flag = STOP_RESIZE
            self.resize_request_id = resize["id"]  # answered by id: never a request withdrawn since
        if self.in_ray:
            import ray.train

            if ray.train.get_preemption_info() is not None:  # collective, same answer on every rank
                flag = max(flag, STOP_PREEMPTION)
        agreed = torch.tensor([flag], device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return int(agreed.item())

    def first_preemption(self, stop: int) -> bool:
        """True once, at the first check that saw a preemption notice: its checkpoint is due."""
        if stop != STOP_PREEMPTION or self.preemption_saved:
            return False
        self.preemption_saved = True
        return True

    @staticmethod
    def checkpoint_requested(stop: int) -> bool:
        """A stop request and an elastic grow both want a checkpoint at this step."""
        return stop in (STOP_REQUESTED, STOP_RESIZE)

    @staticmethod
    def ends_run(stop: int) -> bool:
        return stop == STOP_REQUESTED

    def await_resize(self, stop: int) -> None:
        """After the checkpoint for an elastic grow (not at the last step): wait for Ray's restart."""
        if stop == STOP_RESIZE and self.progress.step < self.max_steps:
            self._await_resize()

    def _await_resize(self) -> None:
        """The checkpoint is committed; Ray restarts the group with more workers as soon as the driver
        side has seen it. Wait for that (bounded), then carry on if it never came."""
        self.checkpoints.wait()  # on rank 0 that includes the commit
        if self.is_main:
            self.store.answer_resize(self.resize_request_id, self.progress.step)
        log.info("checkpoint for the resize written at step %d: waiting for Ray to restart the group",
                 self.progress.step)
        deadline = time.monotonic() + RESIZE_WAIT_S
        while time.monotonic() < deadline and self.store.resize_requested():
            time.sleep(0.5)
        no_grow = self.store.resize_outcome(self.resize_request_id) == "no-grow"
        if not no_grow:  # the request is gone: Ray's restart of the group is on its way
            time.sleep(RESIZE_GRACE_S)
        dist.barrier()
        log.warning("%s after the resize checkpoint at step %d: training on", "the capacity went away" if no_grow
                    else "no restart came", self.progress.step)
