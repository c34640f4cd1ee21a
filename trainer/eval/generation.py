"""One unit of eval work: samples [start, stop) of a SamplingSpec -> uint8 images -> Inception features.

Shared by the Ray eval actors and the single-process path, so both compute the same numbers:
sample i always gets the noise of seed f(spec.seed, i) and the label i % num_classes, and the
work unit is always the same fixed batch (spec.chunks()), whichever process runs it.
Pixel convention (DiT's / ADM's): uint8 = clamp(127.5 x + 128, 0, 255), truncated
(`models.sampling.to_uint8`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .spec import SamplingSpec


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of an eval seeded `seed`."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_noise(seed: int, start: int, stop: int, channels: int, size: int) -> torch.Tensor:
    """(stop - start, C, size, size) float32 standard normal noise, one generator per sample."""
    noise = torch.empty(stop - start, channels, size, size)
    for row, index in enumerate(range(start, stop)):
        generator = torch.Generator().manual_seed(sample_seed(seed, index))
        noise[row] = torch.randn(channels, size, size, generator=generator)
    return noise


def class_labels(start: int, stop: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: sample i is class i % num_classes (exactly balanced when N % C == 0)."""
    return torch.arange(start, stop, dtype=torch.long) % num_classes


def load_eval_model(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """The EMA DiP of a checkpoint (a step-N/ dir, an ema.pt, a `dip export` or the authors' file), eval mode."""
    from trainer.model_io import load_sampling_model

    return load_sampling_model(str(checkpoint), device=device)


@dataclasses.dataclass
class ChunkOutput:
    start: int
    stop: int
    pool: np.ndarray            # (n, 2048) float32
    spatial: np.ndarray         # (n, 2023) float32
    images: np.ndarray | None   # uint8 (n, H, W, 3) when asked for


class ChunkRunner:
    """Holds the Inception network and the last loaded checkpoint's model; runs work units."""

    def __init__(self, device: str | torch.device = "cpu", extractor=None):
        from .inception import InceptionFeatures

        self.device = torch.device(device)
        self.extractor = (extractor or InceptionFeatures()).to(self.device)
        self._model = None
        self._model_path: str | None = None

    def model(self, checkpoint: str | Path):
        if self._model_path != str(checkpoint):
            self._model = None  # free the old weights before loading the new ones
            self._model = load_eval_model(checkpoint, self.device)
            self._model_path = str(checkpoint)
        return self._model

    @torch.no_grad()
    def run(self, checkpoint: str | Path, spec: SamplingSpec, start: int, stop: int,
            keep_images: bool = False) -> ChunkOutput:
        from models.sampling import sample, to_uint8

        model = self.model(checkpoint)
        config = model.config
        num_classes = spec.num_classes if spec.num_classes is not None else config.num_classes
        if num_classes > config.num_classes:
            raise ValueError(f"SamplingSpec.num_classes={num_classes} exceeds the model's {config.num_classes} classes")
        if spec.image_size % config.patch_size:
            raise ValueError(f"SamplingSpec.image_size={spec.image_size} is not a multiple of the model's "
                             f"patch size {config.patch_size}")
        noise = sample_noise(spec.seed, start, stop, config.in_channels, spec.image_size).to(self.device)
        labels = class_labels(start, stop, num_classes).to(self.device)
        x = sample(model, noise, labels, steps=spec.steps, method=spec.method, cfg_scale=spec.cfg_scale,
                   cfg_interval=spec.cfg_interval, timeshift=spec.timeshift)
        images = to_uint8(x)                                   # (n, H, W, 3) uint8 on CPU
        pool, spatial = self.extractor(images.permute(0, 3, 1, 2).to(self.device))
        return ChunkOutput(start, stop, pool.cpu().numpy(), spatial.cpu().numpy(),
                           images.numpy() if keep_images else None)
