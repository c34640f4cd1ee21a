"""A class-by-class grid of EMA samples, saved as a PNG (rows = classes, columns = seeds)."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from trainer.config import SamplesSection

GUTTER = 2  # white pixels around and between the tiles of a saved grid, before upscaling


@torch.no_grad()
def sample_grid(model: torch.nn.Module, samples: SamplesSection, resolution: int, device: torch.device) -> torch.Tensor:
    """(rows*cols, 3, N, N) images in [-1, 1]; fixed noise, so grids of different steps compare."""
    from models.sampling import sample

    generator = torch.Generator(device="cpu").manual_seed(samples.seed)  # never the training streams
    count = samples.num_classes * samples.per_class
    noise = torch.randn(count, 3, resolution, resolution, generator=generator).to(device)
    labels = torch.arange(samples.num_classes).repeat_interleave(samples.per_class).to(device)
    was_training = model.training
    model.eval()
    try:
        images = sample(model, noise, labels, steps=samples.steps, method="euler", cfg_scale=samples.cfg_scale)
    finally:
        model.train(was_training)
    return images.clamp(-1, 1).float().cpu()


def save_grid(images: torch.Tensor, rows: int, path: str, upscale: int = 2) -> str:
    """Tile (rows*cols, 3, N, N) images in [-1, 1] into one PNG with 2-pixel gutters."""
    count, _, size, _ = images.shape
    cols = -(-count // rows)  # ceil: a last row may be short
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    canvas = np.full((rows * (size + GUTTER) + GUTTER, cols * (size + GUTTER) + GUTTER, 3), 255, np.uint8)
    for i in range(count):
        r, c = divmod(i, cols)
        y, x = GUTTER + r * (size + GUTTER), GUTTER + c * (size + GUTTER)
        canvas[y:y + size, x:x + size] = pixels[i]
    image = Image.fromarray(canvas)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path
