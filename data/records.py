"""Record -> training sample: decode, ADM crop, seeded flip. Shared by the MDS and webdataset readers.

Samples stay uint8 (3, N, N) (`npy` records are stored that way; a flip is a strided view, not a
copy); `collate` copies them into one uint8 (B, 3, N, N) batch, and that is what the loader yields.
Scaling to [-1, 1] (`to_pm1`) is the consumer's job, on its device: for pre-cropped shards the float
conversion cost as much as all the reading (benchmarks/data.py), and uint8 is a quarter of the bytes
to pin and copy.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from data.transforms import adm_center_crop, decode_pixels, to_uint8_hwc


def flip_decision(seed: int, epoch: int, key: str) -> bool:
    """A fair coin that depends only on (seed, epoch, key): flips replay exactly after a resume."""
    return bool(hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=1).digest()[0] & 1)


def decode_record(data: bytes, key: str, resolution: int, hflip: bool, seed: int, epoch: int) -> np.ndarray:
    """Encoded bytes -> uint8 (3, N, N) pixels, ADM-cropped and maybe flipped (possibly a strided view:
    `collate` copies it). Raises CorruptImageError for bad bytes."""
    pixels = decode_pixels(data)
    if not (isinstance(pixels, np.ndarray) and pixels.shape[1:] == (resolution, resolution)):
        if isinstance(pixels, np.ndarray):  # raw pixels stored larger than asked: crop like any image
            pixels = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
        pixels = to_uint8_hwc(adm_center_crop(pixels, resolution)).transpose(2, 0, 1)  # (3, N, N) view
    return pixels[:, :, ::-1] if hflip and flip_decision(seed, epoch, key) else pixels


def to_pm1(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (x / 127.5 - 1, the spec's scaling), on pixels' device."""
    return pixels.float().div_(127.5).sub_(1.0)


def collate(samples: list[tuple[np.ndarray, int, str, list[str]]]) -> tuple:
    """[(uint8 (3, N, N) pixels, label, key, corrupt keys)] -> (uint8 pixels (B, 3, N, N), labels (B,),
    keys, corrupt keys)."""
    batch = np.empty((len(samples), *samples[0][0].shape), np.uint8)  # (B, 3, N, N)
    for i, sample in enumerate(samples):
        batch[i] = sample[0]
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)  # (B,)
    return torch.from_numpy(batch), labels, [s[2] for s in samples], [k for s in samples for k in s[3]]
