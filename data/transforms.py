"""Pixel transforms shared by the shard writer and the readers (spec: ADM center crop, [-1, 1])."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


class CorruptImageError(ValueError):
    """The bytes of a record are not a decodable image."""


NPY_MAGIC = b"\x93NUMPY"


def decode_pixels(data: bytes) -> np.ndarray | Image.Image:
    """Stored bytes -> pixels: a uint8 (3, H, W) array for `npy` records (no image codec at all), else
    a decoded RGB PIL image. Raises CorruptImageError for bad bytes."""
    if data[:6] != NPY_MAGIC:
        return decode_image(data)
    array = _decode_npy(data)
    if array.dtype != np.uint8 or array.ndim != 3 or 3 not in (array.shape[0], array.shape[2]):
        raise CorruptImageError(f"npy record holds {array.dtype} {array.shape}, expected uint8 (3, H, W)")
    return array if array.shape[0] == 3 else array.transpose(2, 0, 1)  # (H, W, 3): shards written before CHW


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}  # header bytes -> (dtype, shape)


def _decode_npy(data: bytes) -> np.ndarray:
    """np.load without parsing the same header again for every record (a shard's records share one
    header, and its parse was a tenth of the read cost): a read-only view of `data`."""
    header_end = 10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else -1  # format 1.0
    parsed = _NPY_HEADERS.get(data[:header_end]) if header_end > 0 else None
    try:
        if parsed is None:
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if header_end > 0 and array.flags.c_contiguous and len(_NPY_HEADERS) < 64:
                _NPY_HEADERS[data[:header_end]] = (array.dtype, array.shape)
            return array
        dtype, shape = parsed
        return np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=header_end).reshape(shape)
    except Exception as err:  # truncated or garbled: np.load and frombuffer raise ValueError, EOFError, ...
        raise CorruptImageError(f"{type(err).__name__}: {err}") from err


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, fully loaded (a truncated file raises here)."""
    if data[:6] == NPY_MAGIC:
        array = decode_pixels(data)
        return Image.fromarray(array, "RGB")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # force the whole decode now: truncation surfaces here, not later
        return image.convert("RGB") if image.mode != "RGB" else image
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptImageError(f"{type(err).__name__}: {err}") from err


def verify_image(data: bytes) -> tuple[str, tuple[int, int]]:
    """Check that bytes decode completely; return (PIL format name, (width, height)).

    JPEGs are decoded in draft mode (DCT scaling): every scan is still entropy-decoded, so
    truncation and corruption are caught, at a fraction of the cost of a full decode.
    """
    if data[:6] == NPY_MAGIC:
        array = decode_pixels(data)
        return "NPY", (array.shape[1], array.shape[0])
    try:
        image = Image.open(io.BytesIO(data))
        fmt, size = image.format, image.size
        if fmt == "JPEG":
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
        return str(fmt), size
    except Exception as err:
        raise CorruptImageError(f"{type(err).__name__}: {err}") from err


def adm_center_crop(pil_image: Image.Image, resolution: int) -> Image.Image:
    """ADM center crop (guided-diffusion `center_crop_arr`), returning a `resolution`^2 PIL image.

    Halve with BOX while the short side is >= 2x the target, BICUBIC-resize so the short side equals
    the target, then crop the center.
    """
    if resolution <= 0:
        raise ValueError(f"resolution={resolution} must be > 0")
    image = pil_image
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    new_size = tuple(round(x * scale) for x in image.size)
    if new_size != image.size:  # a same-size BICUBIC resize is the identity: skip its cost
        image = image.resize(new_size, resample=Image.BICUBIC)
    width, height = image.size
    left, top = (width - resolution) // 2, (height - resolution) // 2
    if (left, top, width, height) == (0, 0, resolution, resolution):
        return image
    return image.crop((left, top, left + resolution, top + resolution))


def to_uint8_hwc(pil_image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 RGB array (H, W, 3)."""
    return np.asarray(pil_image.convert("RGB") if pil_image.mode != "RGB" else pil_image)


def to_uint8_chw(pil_image: Image.Image, hflip: bool = False) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W), optionally mirrored left-right."""
    array = to_uint8_hwc(pil_image)  # (H, W, 3)
    if hflip:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


def to_tensor_pm1(pil_image: Image.Image, hflip: bool = False) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1] (x / 127.5 - 1, the spec's scaling)."""
    return to_uint8_chw(pil_image, hflip).float().div_(127.5).sub_(1.0)


def encode_image(pil_image: Image.Image, encoding: str, jpeg_quality: int = 95) -> tuple[bytes, str]:
    """Encode for storage; returns (bytes, file extension). PNG is lossless; JPEG uses 4:4:4 chroma."""
    buffer = io.BytesIO()
    if encoding == "npy":  # raw uint8 (3, H, W) pixels, the layout the loader batches: no decode, no transpose
        np.save(buffer, np.ascontiguousarray(to_uint8_hwc(pil_image).transpose(2, 0, 1)), allow_pickle=False)
        return buffer.getvalue(), "npy"
    if encoding == "png":
        pil_image.save(buffer, format="PNG", compress_level=1)  # fast to write, decode cost is the same
        return buffer.getvalue(), "png"
    if encoding == "jpeg":
        pil_image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
        return buffer.getvalue(), "jpg"
    raise ValueError(f"encoding={encoding!r} is not valid: choose one of ['png', 'jpeg', 'npy']")
