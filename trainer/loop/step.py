"""One optimizer step over this rank's micro-batches, and the EMA update that follows an applied one.

Each micro-batch: the next batch from the loader (the wait for it timed), scaled to [-1, 1] on the
device, draws keyed to (seed, step, sample) (trainer.loop.rng), forward, backward, engine.step (DeepSpeed
applies the update at the last micro-batch). A step whose loss on any rank, or whose gradient norm, is
not finite is skipped on every rank alike (trainer.loop.nonfinite): then nothing was updated, EMA
included; what follows from a skipped step is trainer.loop.recovery's.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

from data.records import to_pm1
from trainer import faults
from trainer.loop.nonfinite import StepGuard, nonfinite_loss_scale
from trainer.loop.rng import keyed_draws


class StepOutcome(NamedTuple):
    loss: torch.Tensor   # the mean over this rank's micro-batches (not finite when the step was skipped)
    data_wait_s: float   # waiting for the loader, of this step's wall time
    applied: bool        # False, on every rank alike, when the step was skipped for a non-finite loss/norm


class OptimizerStep:
    """Runs optimizer steps of one engine on one rank's loader, and keeps the EMA of what it applies."""

    def __init__(self, engine, loader, ema, split, *, seed: int, input_dtype: torch.dtype, rank: int,
                 world_size: int):
        self.engine, self.loader, self.ema, self.split = engine, loader, ema, split
        self.seed, self.input_dtype = seed, input_dtype
        self.rank, self.world_size = rank, world_size
        self.device = engine.device

    def __call__(self, step: int, attempt: str, data_step: int | None = None) -> StepOutcome:
        """The optimizer step after `step` (the draws are keyed to `step`); attempt names this start of the
        run in the sample ledger (trainer.faults). data_step: the global batches the data stream has dealt
        before this one (TrainProgress.data_step: ahead of `step` after a rollback); a poisoned batch
        (trainer.faults) is keyed to data_step + 1, since it is the data, not the step number, that is bad."""
        data_step = step if data_step is None else data_step
        data_wait = 0.0
        losses = []
        guard = StepGuard(self.engine)
        for micro in range(self.split.grad_accum):
            t0 = time.perf_counter()
            pixels, labels, keys = next(self.loader)
            data_wait += time.perf_counter() - t0
            pixels = pixels.to(self.device, non_blocking=True)  # uint8 (B, 3, N, N): a quarter of the bytes
            pixels = to_pm1(pixels).to(self.input_dtype)  # [-1, 1], scaled on the device
            pixels = faults.poison_pixels(data_step + 1, self.rank, pixels)
            labels = labels.to(self.device, non_blocking=True)                           # (B,)
            faults.record_samples(step, self.rank, self.world_size, attempt, keys, data_step)
            # t, noise and label dropout keyed to (seed, step, sample): the same for any split of the batch
            draws = keyed_draws(self.seed, step, keys, tuple(pixels.shape[1:]), self.device)
            loss, _parts = self.engine(pixels, labels, draws)
            losses.append(loss.detach().float())
            if micro == self.split.grad_accum - 1:  # NaN gradients everywhere if any rank's loss was not finite
                loss = loss * nonfinite_loss_scale(losses).to(loss.dtype)
            self.engine.backward(loss)
            self.engine.step()
        if guard.applied:
            self.update_ema()
        return StepOutcome(torch.stack(losses).mean(), data_wait, guard.applied)

    def update_ema(self) -> None:
        self.ema.update(self.engine.module.denoiser)  # local on every rank, at every ZeRO stage


def grad_norm(engine) -> float | None:
    """The global gradient norm of the engine's last step, where DeepSpeed has one."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
