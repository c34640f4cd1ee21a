"""The process-wide RNGs (python, numpy, torch, CUDA) of one rank, captured into and restored from a checkpoint.

Captured as plain tensors/lists: train_state.pt must load with torch.load(weights_only=True), so numpy's
ndarray becomes a list. The layout is the one every train_state.pt holds under ranks[r]["rng"]: keep it.
(The per-sample training draws need no state at all: trainer.loop.rng.)
"""
from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
