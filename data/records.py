"""Record -> training sample: decode, ADM crop, seeded flip. Shared by the MDS and webdataset readers.

Samples stay uint8 (3, N, N) until `collate`, which scales the whole batch to [-1, 1] in one pass:
per-sample float conversion was a measurable share of the cost for pre-cropped shards.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from data.transforms import adm_center_crop, decode_pixels, to_uint8_chw


def flip_decision(seed: int, epoch: int, key: str) -> bool:
    """A fair coin that depends only on (seed, epoch, key): flips replay exactly after a resume."""
    return bool(hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=1).digest()[0] & 1)


def decode_record(data: bytes, key: str, resolution: int, hflip: bool, seed: int, epoch: int) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, N, N), ADM-cropped and maybe flipped. Raises CorruptImageError for bad bytes."""
    pixels = decode_pixels(data)
    flip = hflip and flip_decision(seed, epoch, key)
    if isinstance(pixels, np.ndarray):
        if pixels.shape[:2] == (resolution, resolution):  # pre-cropped raw pixels: no codec, no resize
            chw = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, N, N) view; collate's stack copies it
            return chw.flip(-1) if flip else chw
        from PIL import Image

        pixels = Image.fromarray(pixels, "RGB")
    return to_uint8_chw(adm_center_crop(pixels, resolution), hflip=flip)


def to_pm1(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (x / 127.5 - 1, the spec's scaling)."""
    return pixels.float().div_(127.5).sub_(1.0)


def collate(samples: list[tuple[torch.Tensor, int, str, list[str]]]) -> tuple:
    """[(uint8 pixels, label, key, corrupt keys)] -> (float pixels (B, 3, N, N) in [-1, 1], labels (B,), keys,
    corrupt keys)."""
    pixels = to_pm1(torch.stack([s[0] for s in samples]))  # (B, 3, N, N)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)  # (B,)
    return pixels, labels, [s[2] for s in samples], [k for s in samples for k in s[3]]
