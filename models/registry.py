"""Model sizes by name: S/B/L as in DiT, XL as the authors' (1152 wide, 26 deep, 16 heads)."""
from __future__ import annotations

import dataclasses

from .dip import DiP, DiPConfig

# name -> (hidden_size, depth, num_heads); the patch size is the "/P" suffix.
_WIDTHS = {
    "T": (64, 2, 2),       # tiny: CPU tests and the quickstart
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 26, 16),
}
_NAMES = ("T/16", "S/16", "B/16", "L/16", "XL/16", "XL/32", "XL/64")


def _build_registry() -> dict[str, dict]:
    sizes = {}
    for name in _NAMES:
        width, patch = name.split("/")
        hidden, depth, heads = _WIDTHS[width]
        base = dict(patch_size=int(patch), hidden_size=hidden, depth=depth, num_heads=heads)
        sizes[f"DiP-{name}"] = dict(base, head="detailer")
        sizes[f"DiP-{name}-linear"] = dict(base, head="linear")
    return sizes


DIP_SIZES: dict[str, dict] = _build_registry()


def dip_config(name: str, **overrides) -> DiPConfig:
    """The DiPConfig of a named size; overrides (num_classes, activation_checkpointing, ...) win."""
    if name not in DIP_SIZES:
        raise ValueError(f"unknown model size {name!r}; valid sizes: {', '.join(DIP_SIZES)}")
    return DiPConfig(**{**DIP_SIZES[name], **overrides})


def create_model(name_or_config: str | DiPConfig, **overrides) -> DiP:
    if isinstance(name_or_config, DiPConfig):
        return DiP(dataclasses.replace(name_or_config, **overrides))
    return DiP(dip_config(name_or_config, **overrides))
