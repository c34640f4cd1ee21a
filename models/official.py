"""The authors' released checkpoint layout: a Lightning file with the network under "denoiser."
and its EMA copy under "ema_denoiser." inside "state_dict". Our parameter names equal theirs, so
mapping is only about prefixes; loading is strict and reports every mismatch at once.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

EMA_PREFIX = "ema_denoiser."
RAW_PREFIX = "denoiser."


def network_state(checkpoint: Mapping, ema: bool) -> dict[str, torch.Tensor]:
    """The network's own state dict from a Lightning checkpoint or a plain state dict."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError("checkpoint['state_dict'] is not a mapping of tensors")
    prefix = EMA_PREFIX if ema else RAW_PREFIX
    prefixed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if prefixed:
        return prefixed
    if any(k.startswith((EMA_PREFIX, RAW_PREFIX)) for k in state):
        have = sorted({k.split(".", 1)[0] + "." for k in state if "." in k})
        raise ValueError(f"checkpoint has no weights under {prefix!r} (ema={ema}); prefixes present: {have}")
    return dict(state)  # a plain state dict


def load_official_state_dict(model: nn.Module, checkpoint, ema: bool = True) -> nn.Module:
    """Load the authors' checkpoint (a path, a Lightning dict, or a plain state dict) strictly.

    With ema=True the "ema_denoiser." weights are used (the ones to sample with). Missing,
    unexpected and mis-shaped keys are all listed in one ValueError; nothing is loaded then.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"no checkpoint file at {os.fspath(checkpoint)!r}")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint mapping, got {type(checkpoint).__name__}")
    state = network_state(checkpoint, ema)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        lines = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"{title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(lines))
    model.load_state_dict(state, strict=True)
    return model


def export_official_state_dict(model: nn.Module, ema_model: nn.Module | None = None) -> dict:
    """Our weights in the authors' layout: {"state_dict": {"denoiser.*", "ema_denoiser.*"}}.

    Without an EMA model, the network's own weights fill both prefixes.
    """
    raw = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ema = raw if ema_model is None else {k: v.detach().cpu().clone() for k, v in ema_model.state_dict().items()}
    state = {RAW_PREFIX + k: v for k, v in raw.items()}
    state.update({EMA_PREFIX + k: v for k, v in ema.items()})
    return {"state_dict": state}
