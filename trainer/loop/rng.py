"""The randomness of training: per-sample draws keyed to (seed, step, sample), and the process RNGs.

The noise, t and label-dropout draws of a training sample are a function of (train.seed, optimizer
step, sample key) alone: not of the rank, the world size, the micro-batch or the accumulation split.
So the same step on 1 worker x 2 accumulations and on 2 workers x 1 computes the same math (up to
floating-point reduction order), a resize mid-run changes nothing the loss sees, and there is no
generator state to save or to lose.

The process-wide RNGs are seeded here; a checkpoint captures and restores them per rank
(trainer.checkpoint.rng_state).
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from models.transport import Draws


def sample_seed(seed: int, step: int, key: str) -> int:
    """A 63-bit seed for one sample of one optimizer step (a stable hash: the same in every process).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so there are 2**32 distinct
    draws: a 600-step quickstart's 9,600 seeds are all distinct in those bits; at 10**8 draws (400k
    steps x 256) some 10**6 pairs of draws repeat each other's t, coin and noise (for other images at
    other steps), a negligible share of the training signal."""
    digest = hashlib.blake2b(f"{seed}/{step}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_draws(seed: int, step: int, keys: list[str], image_shape: tuple[int, ...], device) -> Draws:
    """Draws for a batch whose samples are `keys` at optimizer step `step`: each sample's t, dropout and
    noise come from its own generator, so where the sample lands (rank, micro-batch) does not matter."""
    normal_t, uniform, noise = [], [], []
    generator = torch.Generator(device=device)
    for key in keys:
        generator.manual_seed(sample_seed(seed, step, key))
        normal_t.append(torch.randn(1, device=device, generator=generator))
        uniform.append(torch.rand(1, device=device, generator=generator))
        noise.append(torch.randn(image_shape, device=device, generator=generator))
    return Draws(torch.cat(normal_t), torch.cat(uniform), torch.stack(noise))  # (B,), (B,), (B, C, H, W)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
