"""Exponential moving average of the weights, a component with its own state."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """ema <- decay * ema + (1 - decay) * param, every call to update(). Kept in float32."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay={decay!r}: must be in [0, 1]")
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].lerp_(param.detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["weights"], strict=True)
