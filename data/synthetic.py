"""`synthetic`: a procedural, class-conditional image set generated from a seed, at any resolution.

Each class is a bold motif with its own colour family (disc, square, triangle, ring, cross,
stripes, checkerboard, diamond, vertical bars, colour field) drawn at a random place, scale and
shade over a random muted background. Classes stay distinguishable at 32x32, so a tiny DiP learns
them in a few hundred steps and FID against `reference_images` falls as it trains.

An image is a pure function of (seed, index, label, resolution). Geometry is drawn in relative
coordinates, so the same index gives the same picture at every resolution. Beyond 10 classes the
motifs repeat with rotated hues (class c: motif c % 10, hue shift (c // 10) * 0.37 of a turn).
"""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

MOTIFS = (
    "disc", "square", "triangle", "ring", "cross",
    "stripes", "checkerboard", "diamond", "bars", "colour_field",
)
# Base hue per motif (fraction of a turn): neighbours differ in both shape and colour.
MOTIF_HUES = (0.0, 0.33, 0.62, 0.15, 0.85, 0.5, 0.08, 0.72, 0.95, 0.42)
SUPERSAMPLE = 2  # draw at 2x and BOX-downsample: smooth edges at every resolution


def class_names(num_classes: int = 10) -> list[str]:
    """Stable names, sorted as ImageFolder would sort them (zero-padded class index first)."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    return [f"{c:03d}_{MOTIFS[c % len(MOTIFS)]}" + (f"_v{c // len(MOTIFS)}" if c >= len(MOTIFS) else "")
            for c in range(num_classes)]


def label_for(index: int, num_classes: int = 10) -> int:
    """Class of the index-th image: round-robin, so any prefix of the set is class-balanced."""
    return index % num_classes


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def make_image(index: int, label: int, resolution: int, seed: int = 0) -> Image.Image:
    """The index-th synthetic image of class `label`, as an RGB `resolution` x `resolution` image."""
    if resolution < 8:
        raise ValueError(f"resolution={resolution} must be >= 8")
    if index < 0 or label < 0 or seed < 0:
        raise ValueError(f"index={index}, label={label}, seed={seed} must all be >= 0")
    rng = np.random.default_rng([seed, index, label])
    motif = label % len(MOTIFS)
    hue = MOTIF_HUES[motif] + 0.37 * (label // len(MOTIFS)) + rng.uniform(-0.03, 0.03)
    fg = _rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    bg_hue = rng.uniform(0, 1)
    bg_top = np.array(_rgb(bg_hue, rng.uniform(0.1, 0.35), rng.uniform(0.1, 0.35)), np.float32)
    bg_bottom = np.array(_rgb(bg_hue + 0.1, rng.uniform(0.1, 0.35), rng.uniform(0.05, 0.3)), np.float32)

    size = resolution * SUPERSAMPLE
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]  # (S, 1, 1) vertical gradient
    canvas = (bg_top * (1 - ramp) + bg_bottom * ramp) * np.ones((1, size, 1), np.float32)  # (S, S, 3)
    image = Image.fromarray(canvas.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    # Placement and scale, in pixels of the supersampled canvas.
    radius = rng.uniform(0.2, 0.36) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)

    def polygon(num_points: int, scale: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
        angles = angle + phase + 2 * np.pi * np.arange(num_points) / num_points
        return [(cx + scale * radius * np.cos(a), cy + scale * radius * np.sin(a)) for a in angles]

    name = MOTIFS[motif]
    if name == "disc":
        draw.ellipse(box, fill=fg)
    elif name == "square":
        draw.polygon(polygon(4, scale=1.2), fill=fg)
    elif name == "triangle":
        draw.polygon(polygon(3, scale=1.2), fill=fg)
    elif name == "ring":
        draw.ellipse(box, outline=fg, width=max(2, int(radius * 0.35)))
    elif name == "cross":
        arm = radius * 0.32
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fg)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fg)
    elif name == "diamond":
        draw.polygon([(cx, cy - 1.3 * radius), (cx + 0.8 * radius, cy), (cx, cy + 1.3 * radius),
                      (cx - 0.8 * radius, cy)], fill=fg)
    else:
        image = _texture(name, image, fg, rng, size)
    return image.resize((resolution, resolution), resample=Image.BOX)


def _texture(name: str, image: Image.Image, fg: tuple[int, int, int], rng: np.random.Generator,
             size: int) -> Image.Image:
    """Full-frame or half-frame patterns: stripes, checkerboard, bars, colour field."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (S, S) each, in [0, 1)
    base = np.asarray(image, np.float32)  # (S, S, 3)
    fg_arr = np.array(fg, np.float32)
    period = rng.uniform(0.12, 0.22)
    phase = rng.uniform(0, 1)
    if name == "stripes":  # horizontal bands over the whole image
        mask = ((yy / period + phase) % 1.0) < 0.5
    elif name == "bars":  # vertical bars confined to a random half
        left = rng.uniform(0.0, 0.4)
        mask = (((xx / (period * 0.7) + phase) % 1.0) < 0.5) & (xx >= left) & (xx < left + 0.6)
    elif name == "checkerboard":
        cells = (np.floor(xx / period + phase) + np.floor(yy / period + phase)) % 2
        mask = cells < 1
    else:  # colour_field: a smooth blend from the class colour to its complement
        direction = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (np.cos(direction) * (xx - 0.5) + np.sin(direction) * (yy - 0.5)), 0, 1)[..., None]
        other = np.array(_rgb(colorsys.rgb_to_hsv(*(fg_arr / 255))[0] + 0.5, 0.9, 0.9), np.float32)
        return Image.fromarray((fg_arr * (1 - t) + other * t).astype(np.uint8), "RGB")
    out = np.where(mask[..., None], fg_arr, base)
    return Image.fromarray(out.astype(np.uint8), "RGB")


def reference_images(count: int, resolution: int, num_classes: int = 10, seed: int = 0,
                     start: int = 0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Real images for FID reference statistics: uint8 (count, 3, N, N) and labels int64 (count,).

    Images `start .. start + count - 1` of the set (the training set uses indices 0..K-1 with the same
    seed: pass another seed, or a `start` beyond the training size, for held-out images).
    """
    import torch

    if count < 0:
        raise ValueError(f"count={count} must be >= 0")
    images = torch.empty((count, 3, resolution, resolution), dtype=torch.uint8)
    labels = torch.empty((count,), dtype=torch.int64)
    for i in range(count):
        index = start + i
        label = label_for(index, num_classes)
        array = np.asarray(make_image(index, label, resolution, seed))  # (N, N, 3)
        images[i] = torch.from_numpy(array.transpose(2, 0, 1).copy())
        labels[i] = label
    return images, labels
