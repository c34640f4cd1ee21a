"""What a skipped (non-finite) step leads to: a count and a warning each; `train.nonfinite_patience` in a
row roll the run back to its last committed checkpoint, skipping the data since it and rewinding the step
count with the LR schedule; after `train.max_rollbacks` rollbacks in this `dip train` invocation (a Ray
restart of the workers keeps what it has used: TrainProgress.begin_launch) the next one fails the run instead.

How a step is skipped, alike on every rank, is trainer.loop.nonfinite's; the driver turns a failure
into cluster.cli.main.TrainingFailed (FAILED in MLflow, the last committed checkpoint kept as the last
good one).
"""
from __future__ import annotations

import logging

import torch

from trainer.loop.nonfinite import NonFiniteStreak

log = logging.getLogger("dip.train")


class NonFiniteRecovery:
    """The streak of skipped steps of one rank (every rank sees the same), and the rollbacks it causes."""

    def __init__(self, cfg, *, checkpoints, store, loader, progress, is_main: bool, tracker, launch_id: str = ""):
        self.cfg, self.checkpoints, self.store, self.loader = cfg, checkpoints, store, loader
        self.progress, self.is_main, self.tracker = progress, is_main, tracker
        self.streak = NonFiniteStreak(cfg.train.nonfinite_patience)
        # train.max_rollbacks bounds progress.launch_rollbacks: restored from the checkpoint, so a worker
        # restart within one `dip train` keeps its use; a new invocation (a re-run after a divergence) gets
        # its own. progress.rollbacks is the run's total
        progress.begin_launch(launch_id)
        self.failure = ""    # why the workers stop the run (it ends FAILED); "" while all is well

    @property
    def rollbacks(self) -> int:
        """Rollbacks of this `dip train` invocation (what train.max_rollbacks bounds)."""
        return self.progress.launch_rollbacks

    @property
    def in_streak(self) -> bool:
        """Non-finite steps are running: a checkpoint now would leave a rollback nothing before them."""
        return bool(self.streak.streak)

    def step_applied(self) -> None:
        self.streak.reset()

    def step_skipped(self, loss: torch.Tensor) -> bool:
        """The step just counted in progress.step was skipped: note it; roll back after `patience` in a
        row. True when the streak ended it: rolled back (progress.step rewound to the checkpoint's) or,
        with self.failure set, the run must stop instead."""
        roll_back = self.streak.skipped(self.progress.step)
        self.note_nonfinite(loss)
        if roll_back:
            self.roll_back(self.streak.first_step)
            self.streak.reset()
        return roll_back

    def note_nonfinite(self, loss: torch.Tensor) -> None:
        """A skipped step: counted (MLflow `nonfinite_steps`) and named in a warning."""
        self.progress.nonfinite_steps += 1
        if not self.is_main:
            return
        step, streak = self.progress.step, self.streak
        log.warning("step %d: non-finite loss or gradient norm (rank 0's loss %s): optimizer step skipped on every "
                    "rank, no weight, optimizer or EMA update (%d in a row of train.nonfinite_patience=%d; %d in this "
                    "run)", step, f"{loss.item():.4g}", streak.streak, streak.patience, self.progress.nonfinite_steps)
        if self.tracker is not None:
            self.tracker.log_metrics({"nonfinite_steps": self.progress.nonfinite_steps}, step)

    def roll_back(self, first_bad: int) -> None:
        """train.nonfinite_patience skipped steps in a row (first_bad..now): restore the last committed
        checkpoint step-C (engine with its LR schedule, EMA, RNG, step count; collective) and skip the data
        of every step since it, keeping the loader where it is now: training goes on at step C+1 with the
        next data. The run totals (nonfinite_steps, rollbacks, resizes) carry on. After train.max_rollbacks
        rollbacks in this invocation the run stops instead: self.failure says why; the last committed
        checkpoint stays the last good one."""
        cfg, progress = self.cfg, self.progress
        step = progress.step
        streak = f"{cfg.train.nonfinite_patience} non-finite steps in a row (steps {first_bad}..{step})"
        self.checkpoints.wait()  # a write in flight (begun before the streak) commits first
        target = self.checkpoints.newest_loadable()
        if target is None or self.rollbacks >= cfg.train.max_rollbacks:
            where = (f"the last good checkpoint is {self.store.display(target)}; re-running the same command "
                     "resumes from it" if target is not None else "no checkpoint was committed before it")
            self.failure = (f"training diverged: {streak} after {self.rollbacks} rollback(s) (train.max_rollbacks="
                            f"{cfg.train.max_rollbacks}); {where}. Lower optim.lr, set optim.grad_clip, or look at the "
                            f"data of those steps")
            return
        kept = progress.state_dict()
        # the loader stays where it is: the data window target+1..step is not trained again
        self.checkpoints.restore(target, data_state=self.loader.state_dict())
        self.checkpoints.discard_after(target)  # newer step dirs hold discarded work: never resumed from
        progress.load_state_dict(rolled_back(kept, progress.state_dict()))
        event = (f"step {step}: {streak}: rolled back to {self.store.display(target)} and skipped the data of steps "
                 f"{target + 1}..{step} ({(step - target) * cfg.global_batch} samples)")
        if self.is_main:
            log.warning("rollback %d of at most %d: %s; training on from step %d", self.rollbacks,
                        cfg.train.max_rollbacks, event, target + 1)
            if self.tracker is not None:
                self.tracker.set_tags({f"rollback.{progress.rollbacks}": event})
                self.tracker.log_metrics({"rollbacks": progress.rollbacks}, step)


def rolled_back(before: dict, restored: dict) -> dict:
    """The progress after a rollback: the step, samples and goodput ledger of the checkpoint restored (its
    LR schedule with them), the run totals of before it, one more rollback, and the discarded steps added to the
    data stream's position."""
    discarded = before["step"] - restored["step"]
    return {**before, "step": restored["step"], "samples_seen": restored["samples_seen"],
            "goodput": restored.get("goodput"),  # the ledger as of the checkpoint: what came since is lost work
            "rollbacks": before["rollbacks"] + 1, "launch_rollbacks": before["launch_rollbacks"] + 1,
            "discarded_steps": before["discarded_steps"] + discarded}
