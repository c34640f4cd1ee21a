"""Are the synthetic classes recognisable in a sample grid? A small CNN judges each tile.

The quickstart's grid (runs/quickstart/samples/final.png) has one row per class. This script trains a
small CNN classifier on freshly generated synthetic images (a seed the run never saw; ~15 s on 2
cores), cuts the grid into its tiles (the layout of trainer/sample_grid.save_grid) and reports, per
row, how many tiles it classifies as that row's class. Chance is 1 / classes. The classifier is trained
at a fixed seed and thread count, so a grid gets the same score on every run, whatever the caller's threads.

    python benchmarks/grid_classes.py runs/quickstart/samples/final.png [--resolution 32 --classes 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

JUDGE_THREADS = 2  # fixed, whatever the machine: the judge's score of a grid must not depend on it


def classifier(classes: int):
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, classes))


def train_classifier(resolution: int, classes: int, images: int, epochs: int, seed: int = 11):
    """A CNN trained on `images` synthetic images of generation seed `seed`; returns (model, held-out acc)."""
    import torch

    # The same grid must get the same score on any machine and load: a fixed seed, and a fixed thread
    # count (a CPU conv's reductions are split per thread, so their rounding follows the count).
    threads = torch.get_num_threads()
    torch.set_num_threads(JUDGE_THREADS)
    try:
        return _train(resolution, classes, images, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(resolution: int, classes: int, images: int, epochs: int, seed: int):
    import torch
    import torch.nn.functional as F

    from data.records import to_pm1
    from data.synthetic import reference_images

    torch.manual_seed(0)
    x, y = reference_images(images, resolution, classes, seed=seed)
    x = to_pm1(x)
    x_test, y_test = reference_images(max(classes * 20, 200), resolution, classes, seed=seed + 1)
    model = classifier(classes)
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            noisy = x[batch] + 0.1 * torch.randn_like(x[batch])  # samples are imperfect: do not overfit clean pixels
            loss = F.cross_entropy(model(noisy), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(to_pm1(x_test)).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def predict(model, tiles):
    """The judge's class for each tile (N, 3, H, W) in [-1, 1]."""
    import torch

    with torch.no_grad():
        return model(tiles).argmax(1)


def judge_tiles(model, tiles, rows) -> int:
    """How many tiles the judge classifies as their row's class."""
    return int((predict(model, tiles) == rows).sum())


def grid_tiles(path: str, resolution: int, rows: int):
    """(rows * cols, 3, N, N) in [-1, 1] and the row of each tile, cut from a save_grid PNG."""
    import numpy as np
    import torch
    from PIL import Image

    from trainer.loop.sample_grid import GUTTER

    image = np.asarray(Image.open(path).convert("RGB"))
    step = resolution + GUTTER
    upscale = (image.shape[0] - GUTTER) // (rows * step) if image.shape[0] else 0
    if upscale < 1 or image.shape[0] != upscale * (rows * step + GUTTER):
        raise ValueError(f"{path}: {image.shape[0]} px high is not a grid of {rows} rows of {resolution} px tiles")
    cols = (image.shape[1] // upscale - GUTTER) // step
    image = image[::upscale, ::upscale]  # undo the nearest-neighbour upscale
    tiles, row_of = [], []
    for r in range(rows):
        for c in range(cols):
            y, x = GUTTER + r * step, GUTTER + c * step
            tiles.append(image[y:y + resolution, x:x + resolution])
            row_of.append(r)
    pixels = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, torch.tensor(row_of)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="a sample grid PNG with one row per class")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()

    start = time.monotonic()
    model, held_out = train_classifier(args.resolution, args.classes, args.train_images, args.epochs)
    print(f"classifier: {held_out:.3f} accuracy on held-out synthetic images ({time.monotonic() - start:.0f} s)")
    tiles, rows = grid_tiles(args.grid, args.resolution, args.classes)
    predicted = predict(model, tiles)
    for r in range(args.classes):
        mine = rows == r
        print(f"row {r}: {int((predicted[mine] == r).sum())}/{int(mine.sum())} tiles classified as class {r}")
    correct = int((predicted == rows).sum())
    print(f"grid accuracy {correct / len(rows):.3f} ({correct}/{len(rows)} tiles; chance {1 / args.classes:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
