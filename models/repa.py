"""REPA: align the tokens after one block with a frozen encoder's patch features.

A 3-layer MLP projector (D -> D -> D -> feature_dim, SiLU) maps the tokens; the loss is the
negative cosine similarity per token, averaged. The encoder is pluggable: DINOv2-B/14 from a
local weight file (never a hub download), or any module mapping images in [-1, 1] to
(B, T', feature_dim) patch features. TinyEncoder is a small random one for tests.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class REPAProjector(nn.Module):
    def __init__(self, hidden_size: int, feature_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(),
            nn.Linear(hidden_size, hidden_size), nn.SiLU(),
            nn.Linear(hidden_size, feature_dim),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, F)
        return self.mlp(tokens)


def negative_cosine(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """-cos(projected, features) per token, averaged over tokens and batch."""
    return -F.cosine_similarity(projected.float(), features.float(), dim=-1).mean()


def _match_tokens(features: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resample a square grid of encoder patch features to the model's token count."""
    if features.shape[1] == num_tokens:
        return features
    B, N, Fd = features.shape
    side, target = math.isqrt(N), math.isqrt(num_tokens)
    if side * side != N or target * target != num_tokens:
        raise ValueError(f"cannot match {N} encoder patches to {num_tokens} tokens (non-square grid)")
    grid = features.transpose(1, 2).reshape(B, Fd, side, side)
    grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class REPA(nn.Module):
    """The projector (trained) plus the frozen encoder and the settings of the term."""

    def __init__(self, encoder: nn.Module, hidden_size: int, feature_dim: int, block: int = 8, weight: float = 0.5):
        super().__init__()
        if block < 1:
            raise ValueError(f"REPA block={block!r}: must be >= 1")
        self.block = block
        self.weight = weight
        self.projector = REPAProjector(hidden_size, feature_dim)
        self.encoder = encoder.eval().requires_grad_(False)

    def loss(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = _match_tokens(self.encoder(images), tokens.shape[1])
        return negative_cosine(self.projector(tokens), features)

    def train(self, mode: bool = True):  # the encoder stays frozen in eval mode
        super().train(mode)
        self.encoder.eval()
        return self


# ----------------------------------------------------------------------------------------------
#                                          Encoders
# ----------------------------------------------------------------------------------------------

class TinyEncoder(nn.Module):
    """A small random patch encoder for tests: images (B, 3, H, W) -> (B, (H/p)*(W/p), dim)."""

    def __init__(self, dim: int = 32, patch: int = 8):
        super().__init__()
        self.feature_dim = dim
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DINOv2Encoder(nn.Module):
    """DINOv2 ViT (B/14 by default) in plain torch, with the official state-dict names.

    Input: images in [-1, 1]; they are resized to `image_size` and normalised with ImageNet
    statistics. Output: the normalised patch tokens (B, (image_size/14)^2, dim).
    """

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, patch: int = 14,
                 pretrain_grid: int = 37, image_size: int = 224):
        super().__init__()
        self.feature_dim = dim
        self.patch = patch
        self.image_size = image_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid ** 2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _pos_embed(self, grid: int) -> torch.Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = math.isqrt(patch_pos.shape[1])
        if side != grid:
            patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)          # (B, N, D)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embed(self.image_size // self.patch)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 1:]                                        # drop the class token


def load_repa_encoder(path: str) -> DINOv2Encoder:
    """DINOv2-B/14 from a local state-dict file (e.g. the official dinov2_vitb14_pretrain.pth)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"REPA encoder weights not found at {path!r}: give a local DINOv2-B/14 state dict "
            "(dinov2_vitb14_pretrain.pth); weights are never downloaded at run time")
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder = DINOv2Encoder()
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not a DINOv2-B/14 state dict: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return encoder
