"""Samplers for the flow (t = 0 noise -> t = 1 data), exactly as the authors evaluate.

Grid t_k = k / N (k = 0..N), optionally shifted t <- t / (t + (1 - t) * shift). Classifier-free
guidance runs the null and the true labels as one doubled batch: v = v_null + w (v_cond - v_null),
with w applied only inside the guidance interval (Euler: lo < t < hi; Heun: lo < t <= hi, judged
at the step's start time for both evaluations). Heun's last step is a plain Euler step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

METHODS = ("euler", "heun")


def time_grid(steps: int, timeshift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) float32: linspace(0, 1 - 1/N, N) then 1.0, shifted (the authors' construction)."""
    if steps < 1:
        raise ValueError(f"steps={steps!r}: must be >= 1")
    if timeshift <= 0:
        raise ValueError(f"timeshift={timeshift!r}: must be > 0")
    grid = torch.cat([torch.linspace(0.0, 1.0 - 1.0 / steps, steps), torch.tensor([1.0])])
    return grid / (grid + (1 - grid) * timeshift)


def guided_velocity(model, x: torch.Tensor, t: float | torch.Tensor, labels: torch.Tensor, null_label: int,
                    cfg_scale: float) -> torch.Tensor:
    """One velocity evaluation at time t with guidance weight cfg_scale (1 = conditional only)."""
    B = x.shape[0]
    t_batch = (t if torch.is_tensor(t) else torch.tensor(t)).to(x.device, x.dtype).reshape(1).expand(B)
    if cfg_scale == 1.0:
        return model(x, t_batch, labels)  # equals v_null + 1 * (v_cond - v_null): skip the null half
    nulls = torch.full_like(labels, null_label)
    out = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([nulls, labels]))
    v_null, v_cond = out.chunk(2)
    return v_null + cfg_scale * (v_cond - v_null)


@torch.no_grad()
def sample(model, noise: torch.Tensor, labels: torch.Tensor, steps: int = 100, method: str = "euler",
           cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), timeshift: float = 1.0,
           null_label: int | None = None, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate from noise (t = 0) to t = 1; returns x at t = 1, unclamped."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {METHODS}")
    lo, hi = cfg_interval
    if not lo <= hi:
        raise ValueError(f"cfg_interval={cfg_interval!r}: lo must be <= hi")
    if null_label is None:
        null_label = model.config.num_classes
    grid = time_grid(steps, timeshift).to(noise.device, noise.dtype)
    x = noise
    for k in range(steps):
        t_cur, t_next = grid[k], grid[k + 1]
        dt = t_next - t_cur
        if method == "euler":
            w = cfg_scale if lo < t_cur.item() < hi else 1.0
            x = x + guided_velocity(model, x, t_cur, labels, null_label, w) * dt
        else:
            w = cfg_scale if lo < t_cur.item() <= hi else 1.0
            v = guided_velocity(model, x, t_cur, labels, null_label, w)
            x_pred = x + v * dt
            if k < steps - 1:
                v_next = guided_velocity(model, x_pred, t_next, labels, null_label, w)
                x = x + (v + v_next) / 2 * dt
            else:
                x = x_pred  # the last step is a plain Euler step
        if callback is not None:
            callback(k + 1, steps)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), clamped only here (DiT's convention:
    127.5 x + 128, clamped, truncated, i.e. round-half-up of 127.5 (x + 1))."""
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
