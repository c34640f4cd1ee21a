"""The training objective, kept apart from the network (as SiT's transport/ is).

Linear interpolant x_t = t * x + (1 - t) * eps with t = 0 noise and t = 1 data; the network
predicts v = x - eps; plain MSE with constant weight; t ~ logit-normal(0, 1); labels dropped to
the null label with p = 0.1 for classifier-free guidance. Optional REPA adds an alignment term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .repa import REPA


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))  # (B,) -> (B, 1, 1, 1)


@dataclass
class Draws:
    """All the randomness of one loss evaluation, drawn by the caller (a trainer keys it to each sample,
    so a step's math does not depend on how its batch is split over ranks and micro-batches)."""
    normal_t: torch.Tensor       # (B,) N(0, 1): mapped to t by the logit-normal schedule
    uniform_drop: torch.Tensor   # (B,) U[0, 1): the label is dropped where < label_dropout
    noise: torch.Tensor          # (B, C, H, W) N(0, 1)


@dataclass
class FlowMatching:
    num_classes: int
    label_dropout: float = 0.1
    t_mean: float = 0.0
    t_std: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout={self.label_dropout!r}: must be in [0, 1)")
        if self.t_std <= 0:
            raise ValueError(f"t_std={self.t_std!r}: must be > 0")

    @property
    def null_label(self) -> int:
        return self.num_classes

    def sample_t(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logit-normal t = sigmoid(n), n ~ N(mean, std). (B,)"""
        return self.t_from_normal(torch.randn(batch, device=device, generator=generator))

    def t_from_normal(self, normal: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(normal * self.t_std + self.t_mean)

    @staticmethod
    def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _expand(t, x).to(x.dtype)
        return t * x + (1 - t) * noise

    @staticmethod
    def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x - noise

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None,
                    uniform: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_dropout == 0:
            return labels
        if uniform is None:
            uniform = torch.rand(labels.shape, device=labels.device, generator=generator)
        drop = uniform < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def loss(self, model, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
             repa: REPA | None = None, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             draws: Draws | None = None):
        """Returns (scalar loss, dict of detached parts). The randomness comes from `draws` when given,
        else from `generator` (t / noise may also be fixed by the caller)."""
        if draws is not None:
            t = self.t_from_normal(draws.normal_t.to(x.device))
            noise = draws.noise.to(x.device, x.dtype)
            labels = self.drop_labels(labels, uniform=draws.uniform_drop.to(labels.device))
        else:
            if t is None:
                t = self.sample_t(x.shape[0], x.device, generator)
            if noise is None:
                noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            labels = self.drop_labels(labels, generator)
        x_t = self.interpolate(x, noise, t)
        target = self.velocity_target(x, noise)
        if repa is None:
            v = model(x_t, t, labels)
            fm = F.mse_loss(v.float(), target.float())
            return fm, {"loss_fm": fm.detach()}
        v, tokens = model(x_t, t, labels, feature_block=repa.block)
        fm = F.mse_loss(v.float(), target.float())
        align = repa.loss(tokens, x)
        total = fm + repa.weight * align
        return total, {"loss_fm": fm.detach(), "loss_repa": align.detach()}
