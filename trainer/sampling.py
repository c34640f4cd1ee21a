"""Sampling from a checkpoint, what `dip sample` does: the model a checkpoint records (or a freshly
initialised one), images of the given labels drawn from seeded noise, laid out as a PNG grid.

Resolution and classes default to what the checkpoint records (trainer.model_io.checkpoint_facts):
the resolution its run trained at, the classes of its model. A requested value the model cannot
take is refused with the flag that asked for it."""
from __future__ import annotations

import math
import os


def sample_pixels(model, labels: list[int], side: int, seed: int = 0, steps: int = 100, method: str = "euler",
                  cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), timeshift: float = 1.0,
                  device="cpu", precision: str = "bf16", callback=None):
    """What `dip sample` draws: uint8 (B, side, side, C) images of `labels`, from noise seeded by `seed`
    (drawn on the CPU, so every device starts from the same noise)."""
    import torch

    from models.sampling import sample, to_uint8
    from models.speed import mixed_precision

    config = model.config
    device = torch.device(device)
    label_tensor = torch.tensor(labels, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(len(labels), config.in_channels, side, side, generator=generator).to(device)
    with mixed_precision(device, precision):
        x = sample(model, noise, label_tensor, steps=steps, method=method, cfg_scale=cfg_scale,
                   cfg_interval=cfg_interval, timeshift=timeshift, null_label=config.num_classes, callback=callback)
    return to_uint8(x)


def sampling_device(name: str):
    """`auto` (cuda when there is one, else cpu) or a torch device name."""
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                        else "cpu" if name == "auto" else name)


def model_to_sample(checkpoint: str | None, init_model: str | None, device, resolution: int | None = None,
                    num_classes: int | None = None, seed: int = 0):
    """(model in eval mode, image side, where the side came from) for a checkpoint, or for a freshly
    initialised model of size `init_model` (seeded by `seed`, `num_classes` classes, default 10). Every
    request is checked against what the checkpoint records before it is loaded."""
    import torch

    from models.registry import create_model
    from trainer.model_io import checkpoint_facts, sampling_side

    if checkpoint:
        facts = checkpoint_facts(checkpoint)
        if num_classes not in (None, facts.config.num_classes):
            raise ValueError(f"--num-classes {num_classes}: the checkpoint's model has "
                             f"{facts.config.num_classes} classes (--num-classes is for --init-model)")
        side, side_from = facts.image_side(resolution, "--resolution")
        return facts.load_model(device), side, side_from  # the file checkpoint_facts resolved and verified
    torch.manual_seed(seed)
    model = create_model(init_model, num_classes=10 if num_classes is None else num_classes).to(device).eval()
    side, side_from = sampling_side(model.config, resolution, None, "--resolution")
    return model, side, side_from


def labels_to_sample(labels: list[int] | None, num_classes: int) -> list[int]:
    """`labels`, or the first 4 classes; each must be a class of the model or its null label."""
    if labels is None:
        labels = list(range(min(4, num_classes)))
    bad = [y for y in labels if not 0 <= y <= num_classes]
    if bad:
        raise ValueError(f"--labels {bad} outside 0..{num_classes} ({num_classes} = null label)")
    return labels


def save_grid(pixels, side: int, out: str) -> None:
    """uint8 (B, side, side, C) images as a near-square PNG grid, row by row."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(pixels)))
    rows = math.ceil(len(pixels) / cols)
    grid = Image.new("RGB", (cols * side, rows * side))
    for i, image in enumerate(pixels):
        grid.paste(Image.fromarray(image), ((i % cols) * side, (i // cols) * side))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid.save(out)
