"""Non-finite training steps: one decision on every rank, no update, a count; K in a row roll back.

A step is non-finite when the loss of any micro-batch on any rank, or the global gradient norm, is
NaN or Inf. It is skipped without touching DeepSpeed's gradient-accumulation bookkeeping:

* Before the last backward of a step the ranks all-reduce (MAX) a flag of non-finite micro-batch
  losses. Every rank multiplies that last loss by NaN when the flag is set, by 1.0 otherwise (exact,
  and no host sync on the step's critical path): a non-finite loss anywhere makes the gradients
  non-finite everywhere.
* DeepSpeed's optimizers skip a step whose global gradient norm is not finite (ZeRO-1/2/3 and the
  bf16 optimizer: their overflow path, the norm reduced over all ranks, so every rank decides alike):
  gradients zeroed, weights, optimizer state and LR schedule untouched, `engine.skipped_steps` + 1.
  A plain torch optimizer (ZeRO-0 in fp32) has no such path; `guard_plain_optimizer` gives it one
  (its gradients are all-reduced before the step: the same on every rank).
* The loop updates the EMA only when `engine.skipped_steps` did not move (`StepGuard.applied`).

`train.nonfinite_patience` (K) skipped steps in a row roll the run back to its last committed
checkpoint (its step count and LR schedule) and skip the data since it; after `train.max_rollbacks`
rollbacks in one `dip train` invocation the next one stops the run (trainer.loop.recovery: the policy;
this module: the mechanism of a skip).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.checkpoint.pins import require


def guard_plain_optimizer(engine) -> None:
    """Give an optimizer without DeepSpeed's overflow check (a torch optimizer under ZeRO-0 in fp32) one:
    a step with a non-finite gradient norm does nothing and reports `overflow`, which DeepSpeed's engine
    reads to count the step as skipped and leave the LR schedule alone. Called at every engine's build:
    the skip rests on DeepSpeed's overflow path, so an untested DeepSpeed is refused here."""
    require("non-finite step skip")
    optimizer = engine.optimizer
    if hasattr(optimizer, "overflow"):  # DeepSpeed's own optimizers: the check is theirs
        return
    step = optimizer.step

    def step_if_finite(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
        optimizer.overflow = not math.isfinite(norm.item())
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step_if_finite


def nonfinite_loss_scale(losses: list[torch.Tensor]) -> torch.Tensor:
    """NaN when a loss in `losses` on any rank is not finite, else 1.0 (collective: every rank calls it)."""
    flag = (~torch.isfinite(torch.stack(losses))).any().float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return torch.where(flag[0] > 0, float("nan"), 1.0)  # 0-dim: the loss stays a scalar


class StepGuard:
    """Around one optimizer step: whether the engine applied the update (DeepSpeed counts a step it
    skipped in engine.skipped_steps)."""

    def __init__(self, engine):
        self.engine = engine
        self.skipped_before = engine.skipped_steps

    @property
    def applied(self) -> bool:
        return self.engine.skipped_steps == self.skipped_before


@dataclass
class NonFiniteStreak:
    """Consecutive skipped steps, and when they call for a rollback."""
    patience: int
    streak: int = 0
    first_step: int = 0

    def skipped(self, step: int) -> bool:
        """Note a skipped step; True when `patience` steps in a row were skipped (time to roll back)."""
        if self.streak == 0:
            self.first_step = step
        self.streak += 1
        return self.streak >= self.patience

    def reset(self) -> None:
        self.streak = 0
