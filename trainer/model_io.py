"""Load a DiP for sampling from any of the formats users hold.

- the authors' released Lightning checkpoint (EMA weights under "ema_denoiser."), config inferred
  from the tensor shapes;
- a `dip export` file: {"model_config": dict, "state_dict": EMA weights} (also what every
  committed checkpoint keeps as ema.pt);
- one of our committed checkpoint directories (step-N/, or a run's checkpoint root: the newest
  committed step is used).
Everything is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import os
import re

import torch

from models import DiP, DiPConfig, load_official_state_dict
from models.official import EMA_PREFIX, RAW_PREFIX

EMA_FILE = "ema.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def infer_config(state: dict[str, torch.Tensor]) -> DiPConfig:
    """DiPConfig from the shapes of a network state dict (no prefixes)."""
    try:
        hidden, patch_features = state["s_embedder.proj.weight"].shape
        head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        mlp_hidden = state["blocks.0.mlp.w1.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"not a DiP state dict: no {missing} key") from None
    head = "detailer" if any(k.startswith("local_decoder.") for k in state) else "linear"
    in_channels = state["local_decoder.out_conv.weight"].shape[0] if head == "detailer" else 3
    patch = round((patch_features / in_channels) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp_ratio = 4.0 if int(2 * int(hidden * 4.0) / 3) == mlp_hidden else 3 * mlp_hidden / (2 * hidden)
    return DiPConfig(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=hidden // head_dim,
                     num_classes=num_classes, in_channels=in_channels, head=head, mlp_ratio=mlp_ratio)


def committed_steps(root: str, marker: str) -> list[str]:
    """step-N/ directories under root that hold `marker`, oldest first."""
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, marker)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def resolve_checkpoint_path(path: str) -> str:
    """A file to read: the file itself, DIR/ema.pt, or the newest committed step's ema.pt."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, EMA_FILE)):
        return os.path.join(path, EMA_FILE)
    from trainer.checkpoint_store import MARKER  # the trainer decides what "committed" means

    steps = committed_steps(path, MARKER)
    if not steps:
        raise FileNotFoundError(f"{path!r} holds no committed step-N/ checkpoint with {EMA_FILE}")
    return os.path.join(steps[-1], EMA_FILE)


def load_sampling_model(path: str, device: str | torch.device = "cpu") -> DiP:
    """The EMA network in eval mode, from any supported checkpoint format."""
    file = resolve_checkpoint_path(path)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, or a pickle that is more than weights
        raise ValueError(f"cannot read checkpoint {file!r} as weights: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{file!r} is not a checkpoint dict")
    if "model_config" in checkpoint:
        model = DiP(DiPConfig(**checkpoint["model_config"]))
        load_official_state_dict(model, checkpoint["state_dict"])
    else:
        state = checkpoint.get("state_dict", checkpoint)
        prefix = EMA_PREFIX if any(k.startswith(EMA_PREFIX) for k in state) else RAW_PREFIX
        network = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or state
        model = load_official_state_dict(DiP(infer_config(network)), checkpoint, ema=prefix == EMA_PREFIX)
    # Not frozen with requires_grad_(False): autocast caches its bf16 weight casts only for
    # leaves that require grad, and sampling already runs under no_grad.
    return model.to(device).eval()
