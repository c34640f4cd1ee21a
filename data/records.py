"""Record -> training sample: decode, ADM crop, seeded flip. Shared by the MDS and webdataset readers."""
from __future__ import annotations

import hashlib

import torch

import numpy as np

from data.transforms import adm_center_crop, decode_pixels, to_tensor_pm1


def flip_decision(seed: int, epoch: int, key: str) -> bool:
    """A fair coin that depends only on (seed, epoch, key): flips replay exactly after a resume."""
    return bool(hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=1).digest()[0] & 1)


def decode_record(data: bytes, key: str, resolution: int, hflip: bool, seed: int, epoch: int) -> torch.Tensor:
    """Encoded bytes -> float32 (3, N, N) in [-1, 1]. Raises CorruptImageError for bad bytes."""
    pixels = decode_pixels(data)
    flip = hflip and flip_decision(seed, epoch, key)
    if isinstance(pixels, np.ndarray):
        if pixels.shape[:2] == (resolution, resolution):  # pre-cropped raw pixels: no codec, no resize
            array = pixels[:, ::-1] if flip else pixels  # (N, N, 3)
            return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)
        from PIL import Image

        pixels = Image.fromarray(pixels, "RGB")
    return to_tensor_pm1(adm_center_crop(pixels, resolution), hflip=flip)


def collate(samples: list[tuple[torch.Tensor, int, str, list[str]]]) -> tuple:
    """[(pixels, label, key, corrupt keys)] -> (pixels (B, 3, N, N), labels (B,), keys, corrupt keys)."""
    pixels = torch.stack([s[0] for s in samples])  # (B, 3, N, N)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)  # (B,)
    return pixels, labels, [s[2] for s in samples], [k for s in samples for k in s[3]]
