"""Shared helpers for the eval tests (no tests here): real photos, a tiny checkpoint, a TF1 resize."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


def photos() -> list[np.ndarray]:
    """Real photos shipped inside installed packages: uint8 (H, W, 3) each."""
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = list(load_sample_images().images)  # china.jpg, flower.jpg (427 x 640)
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        images.append(np.asarray(Image.open(handle).convert("RGB")))
    return images


def photo_crops(count: int, size: int, seed: int, sources: list[int] | None = None) -> np.ndarray:
    """uint8 (count, size, size, 3) random crops of the real photos."""
    rng = np.random.default_rng(seed)
    pool = photos()
    sources = sources if sources is not None else list(range(len(pool)))
    crops = []
    for _ in range(count):
        image = pool[sources[rng.integers(len(sources))]]
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        crops.append(image[top:top + size, left:left + size])
    return np.stack(crops)


def tf1_resize_bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) written out in numpy,
    float64, for (H, W, C) input: source coordinate = output index * in / out, upper neighbour
    clamped to the last pixel. Written independently of the grid_sample implementation."""
    in_h, in_w = image.shape[:2]
    image = image.astype(np.float64)
    ys = np.arange(out_h) * (in_h / out_h)
    xs = np.arange(out_w) * (in_w / out_w)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, in_h - 1)
    x1 = np.minimum(x0 + 1, in_w - 1)
    dy = (ys - y0)[:, None, None]
    dx = (xs - x0)[None, :, None]
    top = image[y0][:, x0] + (image[y0][:, x1] - image[y0][:, x0]) * dx
    bottom = image[y1][:, x0] + (image[y1][:, x1] - image[y1][:, x0]) * dx
    return top + (bottom - top) * dy


def commit_step_dir(step_dir: Path) -> None:
    """Commit a hand-made step-N/ as the trainer does: a COMMITTED marker listing each file's size and
    checksum (trainer.checkpoint.store)."""
    from trainer.checkpoint.store import CheckpointStore

    store = CheckpointStore(str(step_dir.parent))
    files = {f.name: store.write_stream(f"{step_dir.name}/{f.name}", lambda out, data=f.read_bytes(): out.write(data))
             for f in sorted(step_dir.iterdir())}
    store.commit(int(step_dir.name.split("-")[1]), files, {})


def save_tiny_checkpoint(directory: Path, num_classes: int = 10, seed: int = 0, trained_at: int | None = None) -> Path:
    """A committed-checkpoint-style `step-N/ema.pt` of an untrained DiP-T/16; with trained_at, also the
    train_state.pt config of a run at that resolution (what `dip sample` / `dip eval run` default to)."""
    import torch

    from models.registry import create_model
    from trainer.config import config_from_dict, to_dict

    torch.manual_seed(seed)
    model = create_model("DiP-T/16", num_classes=num_classes)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": dataclasses.asdict(model.config), "state_dict": model.state_dict()},
               directory / "ema.pt")
    if trained_at is not None:
        data = {"path": "synthetic", "resolution": trained_at, "synthetic_classes": num_classes}
        run = config_from_dict({"model": {"name": "DiP-T/16", "num_classes": num_classes}, "data": data,
                                "samples": {"num_classes": num_classes}})
        torch.save({"config": to_dict(run)}, directory / "train_state.pt")
    return directory
