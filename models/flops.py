"""FLOPs per image, counted by torch.utils.flop_counter (matmuls, convolutions, attention).

Conventions (the usual MFU ones): a multiply-add is 2 FLOPs; only matmul/conv/attention work is
counted (norms, activations and elementwise ops are not); training costs 3x the forward (forward
+ backward for inputs + backward for weights), whether or not activation checkpointing recomputes
the forward: MFU measures useful model FLOPs, not what the hardware re-did.

Counting runs on the meta device by default: exact for shapes, no weights allocated, instant even
for DiP-XL. On a real CPU tensor, SDPA dispatches to an op the stock counter does not know
(`_scaled_dot_product_flash_attention_for_cpu`), so we register its formula here: without it the
attention FLOPs would silently be missing from CPU counts.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .dip import DiP, DiPConfig

TRAINING_FLOPS_PER_FORWARD = 3
HEAD_MODULES = ("local_decoder", "final_layer")  # detailer head / linear ablation head (models/dip.py)


def _cpu_sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode shape-wraps custom formulas: they receive shapes, like the stock ones.
_CPU_ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode with per-module breakdown at every depth, CPU attention included."""
    return FlopCounterMode(display=False, depth=None, custom_mapping=dict(_CPU_ATTENTION_FORMULAS))


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Run fn() under a counter; returns (total FLOPs, {module path: FLOPs})."""
    with flop_counter() as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per image of one forward pass, split into the backbone and the output head."""
    forward: int
    head: int

    def __post_init__(self):
        if self.forward <= 0:
            raise ValueError(f"FlopCount.forward={self.forward}: must be > 0")
        if not 0 <= self.head <= self.forward:
            raise ValueError(f"FlopCount.head={self.head}: must be in [0, forward={self.forward}]")

    @property
    def backbone(self) -> int:
        return self.forward - self.head

    @property
    def training(self) -> int:
        """Forward + backward per image (3x forward, the MFU convention)."""
        return TRAINING_FLOPS_PER_FORWARD * self.forward

    @property
    def head_share(self) -> float:
        return self.head / self.forward

    def as_dict(self) -> dict[str, float]:
        return {"forward_flops": self.forward, "training_flops": self.training, "backbone_flops": self.backbone,
                "head_flops": self.head, "head_share": self.head_share}


def model_flops(model: DiP, resolution: int, batch: int = 1) -> FlopCount:
    """Count one forward of `model` at resolution x resolution, on the model's own device; per image."""
    if batch < 1:
        raise ValueError(f"batch={batch}: must be >= 1")
    patch = model.config.patch_size
    if resolution < patch or resolution % patch:
        raise ValueError(f"resolution={resolution} must be a positive multiple of the patch size {patch}")
    param = next(model.parameters())
    x = torch.zeros(batch, model.config.in_channels, resolution, resolution, device=param.device, dtype=param.dtype)
    t = torch.full((batch,), 0.5, device=param.device)
    y = torch.zeros(batch, dtype=torch.long, device=param.device)
    with torch.no_grad():
        total, per_module = count_flops(lambda: model(x, t, y))
    root = type(model).__name__
    head = sum(per_module.get(f"{root}.{name}", 0) for name in HEAD_MODULES)
    return FlopCount(forward=total // batch, head=head // batch)


def dip_flops(config: DiPConfig | str, resolution: int) -> FlopCount:
    """FLOPs per image of a DiP size (a registry name or a DiPConfig), counted on the meta device."""
    if isinstance(config, str):
        from .registry import dip_config

        config = dip_config(config)
    with torch.device("meta"):
        model = DiP(config)
    return model_flops(model, resolution)


def module_training_flops(module: nn.Module, example_input: torch.Tensor) -> int:
    """Training FLOPs (3x forward) of any module on one example batch: for hand-checkable tests."""
    with torch.no_grad():
        forward, _ = count_flops(lambda: module(example_input))
    return TRAINING_FLOPS_PER_FORWARD * forward


def repa_training_flops(encoder: nn.Module, hidden_size: int, num_tokens: int, resolution: int) -> int:
    """REPA's part of one image's training FLOPs: the frozen encoder's forward (never trained: no
    backward) plus the projector's forward and backward (3x). Counted on the meta device."""
    from .repa import REPAProjector

    with torch.device("meta"):
        encoder = encoder.to("meta")
        projector = REPAProjector(hidden_size, encoder.feature_dim)
        images = torch.zeros(1, 3, resolution, resolution)
        tokens = torch.zeros(1, num_tokens, hidden_size)
    with torch.no_grad():
        encoder_forward, _ = count_flops(lambda: encoder(images))
        projector_forward, _ = count_flops(lambda: projector(tokens))
    return encoder_forward + TRAINING_FLOPS_PER_FORWARD * projector_forward
