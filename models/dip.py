"""DiP: a DiT backbone on large patches plus a per-patch convolutional Patch Detailer Head.

Pure torch: no I/O, no distributed code. Every fact here follows ../shared/spec/dip-model.md;
parameter names follow the authors' released checkpoint so its weights load without renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

HEAD_CHOICES = ("detailer", "linear")
# "authors": the published init (the spec). "variance_preserving": opt-in, for short runs of small
# models (see initialize_weights and benchmarks/conditioning.py).
INIT_CHOICES = ("authors", "variance_preserving")
PATCH_CHOICES = (16, 32, 64)
RoPECache = dict[tuple[int, int, str], torch.Tensor]


# ----------------------------------------------------------------------------------------------
#                                           Config
# ----------------------------------------------------------------------------------------------

@dataclass
class DiPConfig:
    patch_size: int = 16
    hidden_size: int = 1152
    depth: int = 26
    num_heads: int = 16
    num_classes: int = 1000
    in_channels: int = 3
    head: str = "detailer"            # "detailer" (DiP) or "linear" (the paper's ablation)
    mlp_ratio: float = 4.0
    activation_checkpointing: bool = False  # recompute each block / the head in backward
    init: str = "authors"             # one of INIT_CHOICES; changes no shape, only the starting weights

    def __post_init__(self):
        if self.patch_size not in PATCH_CHOICES:
            raise ValueError(f"DiPConfig.patch_size={self.patch_size!r}: must be one of {PATCH_CHOICES}")
        if self.head not in HEAD_CHOICES:
            raise ValueError(f"DiPConfig.head={self.head!r}: must be one of {HEAD_CHOICES}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"DiPConfig.init={self.init!r}: must be one of {INIT_CHOICES}")
        for name in ("hidden_size", "depth", "num_heads", "num_classes", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiPConfig.{name}={value!r}: must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiPConfig.hidden_size={self.hidden_size} must be divisible by "
                             f"num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"DiPConfig: head_dim={self.hidden_size // self.num_heads} must be a multiple "
                             "of 4 (2-D RoPE splits it into x/y complex pairs)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"DiPConfig.mlp_ratio={self.mlp_ratio!r}: must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# ----------------------------------------------------------------------------------------------
#                                   Embeddings and 2-D RoPE
# ----------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Flattened (C, P, P) patch -> width D. No absolute position embedding (RoPE carries position)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(in_features, hidden_size, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (B, T, C*P*P) -> (B, T, D)
        return self.proj(patches)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (max_period 10, [cos, sin]) -> MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, F)
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period)
                          * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, D)
        freq = self.sinusoidal(t)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A table of num_classes + 1 rows; the last row is the null label used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, D)
        return self.embedding_table(labels)


def rope_2d_frequencies(head_dim: int, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """Complex rotations (h*w, head_dim/2) for a grid of tokens.

    Positions are linspace(0, 16, w) along x and linspace(0, 16, h) along y: they depend on the
    grid size, not the token index. Pairs alternate x, y, x, y; pair 2i uses frequency f_i.
    """
    x_pos = torch.linspace(0, 16, grid_w, device=device)
    y_pos = torch.linspace(0, 16, grid_h, device=device)
    y_pos, x_pos = torch.meshgrid(y_pos, x_pos, indexing="ij")
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
    x_angles = torch.outer(x_pos.reshape(-1), freqs)                       # (T, head_dim/4)
    y_angles = torch.outer(y_pos.reshape(-1), freqs)                       # (T, head_dim/4)
    angles = torch.stack([x_angles, y_angles], dim=-1).reshape(grid_h * grid_w, -1)  # (T, head_dim/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the head dimension by freqs_cis. x (B, T, H, Dh); math in float32.

    The complex product is written out in real arithmetic so torch.compile can fuse it with the
    QK-norm (inductor has no complex codegen); it equals the complex form to 1 ulp in float32.
    """
    cos = freqs_cis.real[None, :, None, :]                                   # (1, T, 1, Dh/2)
    sin = freqs_cis.imag[None, :, None, :]
    x_re, x_im = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)          # (B, T, H, Dh/2) each
    rotated = torch.stack([x_re * cos - x_im * sin, x_re * sin + x_im * cos], dim=-1).flatten(3)
    return rotated.type_as(x)


# ----------------------------------------------------------------------------------------------
#                                      Transformer block
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm computed in float32 with a learnable weight (eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Fused qkv (no bias), per-head QK RMSNorm, 2-D RoPE, SDPA, output projection (with bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # rows [q; k; v], head-major
        q, k, v = qkv.unbind(dim=2)                                         # (B, T, H, Dh) each
        q = apply_rope(self.q_norm(q), freqs_cis)
        k = apply_rope(self.k_norm(k), freqs_cis)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(B, T, D))             # (B, T, D)


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no bias, hidden = int(2 * mlp_ratio * D / 3)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiPBlock(nn.Module):
    """Pre-norm block with adaLN: x <- x + gate * f(norm(x) * (1 + scale) + shift)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        # c (B, 1, D) broadcasts over tokens; chunk order is the authors'.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), freqs_cis)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


# ----------------------------------------------------------------------------------------------
#                                          Output heads
# ----------------------------------------------------------------------------------------------

def _conv_silu(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2), nn.SiLU())


class PatchDetailerHead(nn.Module):
    """Per-patch conv U-Net. Input: the noisy patch (C, P, P) and its token s at the bottleneck.

    Four 2x2 max-pools take P to P/16, so the token is repeated to (P/16, P/16) for P > 16.
    """

    def __init__(self, in_channels: int, context_size: int):
        super().__init__()
        self.enc1 = _conv_silu(in_channels, 64, 3)
        self.enc2 = _conv_silu(64, 128, 3)
        self.enc3 = _conv_silu(128, 256, 3)
        self.enc4 = _conv_silu(256, 512, 3)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bottleneck = _conv_silu(512 + context_size, 512, 1)
        self.up4 = nn.ConvTranspose2d(512, 512, kernel_size=2, stride=2)
        self.dec4 = _conv_silu(512 + 512, 256, 3)
        self.up3 = nn.ConvTranspose2d(256, 256, kernel_size=2, stride=2)
        self.dec3 = _conv_silu(256 + 256, 128, 3)
        self.up2 = nn.ConvTranspose2d(128, 128, kernel_size=2, stride=2)
        self.dec2 = _conv_silu(128 + 128, 64, 3)
        self.up1 = nn.ConvTranspose2d(64, 64, kernel_size=2, stride=2)
        self.dec1 = _conv_silu(64 + 64, 64, 3)
        self.out_conv = nn.Conv2d(64, in_channels, kernel_size=1)

    def forward(self, patches: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # patches (N, C, P, P); context (N, D, P/16, P/16); N = B * T
        e1 = self.enc1(patches)                      # (N, 64, P, P)
        e2 = self.enc2(self.pool(e1))                # (N, 128, P/2, P/2)
        e3 = self.enc3(self.pool(e2))                # (N, 256, P/4, P/4)
        e4 = self.enc4(self.pool(e3))                # (N, 512, P/8, P/8)
        b = self.bottleneck(torch.cat([self.pool(e4), context], dim=1))  # (N, 512, P/16, P/16)
        d = self.dec4(torch.cat([self.up4(b), e4], dim=1))
        d = self.dec3(torch.cat([self.up3(d), e3], dim=1))
        d = self.dec2(torch.cat([self.up2(d), e2], dim=1))
        d = self.dec1(torch.cat([self.up1(d), e1], dim=1))
        return self.out_conv(d)                      # (N, C, P, P)


class LinearHead(nn.Module):
    """The ablation: a DiT-style final layer (adaLN-modulated LayerNorm + Linear to P*P*C)."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, C*P*P)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(tokens), shift, scale))


# ----------------------------------------------------------------------------------------------
#                                            DiP
# ----------------------------------------------------------------------------------------------

class DiP(nn.Module):
    """model(x, t, y) -> velocity v = x - eps, same shape as x (B, C, H, W).

    x: images or x_t in [-1, 1]; t (B,) in [0, 1] with t = 1 data; y (B,) labels, num_classes = null.
    """

    def __init__(self, config: DiPConfig):
        super().__init__()
        self.config = config
        C, P, D = config.in_channels, config.patch_size, config.hidden_size
        self.s_embedder = PatchEmbed(C * P * P, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.blocks = nn.ModuleList(DiPBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        if config.head == "detailer":
            self.local_decoder = PatchDetailerHead(C, D)
        else:
            self.final_layer = LinearHead(D, C * P * P)
        self._rope_cache: RoPECache = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The authors' init; every other parameter keeps PyTorch's default.

        init="variance_preserving" (opt-in) changes two things. At the authors' init the label reaches
        the output only through the detailer's bottleneck, ten PyTorch-default conv layers (each
        shrinking the signal ~3x) from the output, with a label table of std 0.02: the label moves the
        output by ~1e-8 and the backbone's gradients sit below AdamW's eps, so a small model takes
        thousands of steps to become class-conditional. Here the head's convs are He-normal with zero
        biases (signal scale kept through SiLU) and the label table is N(0, 1), as large as the tokens.
        """
        nn.init.xavier_uniform_(self.s_embedder.proj.weight)
        nn.init.zeros_(self.s_embedder.proj.bias)
        label_std = 1.0 if self.config.init == "variance_preserving" else 0.02
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=label_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.config.init == "variance_preserving" and self.config.head == "detailer":
            head = self.local_decoder
            for module in head.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                elif isinstance(module, nn.ConvTranspose2d):
                    # 2x2 stride 2: each output pixel sees one tap of each input channel, so fan-in = in
                    nn.init.normal_(module.weight, std=math.sqrt(2.0 / module.in_channels))
                else:
                    continue
                nn.init.zeros_(module.bias)
            nn.init.xavier_uniform_(head.out_conv.weight)  # linear output: no ReLU gain

    def rope(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        """2-D RoPE rotations, computed once per (grid, device) and cached."""
        key = (grid_h, grid_w, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_2d_frequencies(self.config.head_dim, grid_h, grid_w, device=device)
        return self._rope_cache[key]

    def _maybe_checkpoint(self, fn, *args):
        if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, feature_block: int | None = None):
        B, C, H, W = x.shape
        P = self.config.patch_size
        if H % P or W % P:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {P}")
        grid_h, grid_w = H // P, W // P
        freqs_cis = self.rope(grid_h, grid_w, x.device)

        patches = F.unfold(x, kernel_size=P, stride=P).transpose(1, 2)    # (B, T, C*P*P), channel-major
        t_emb = self.t_embedder(t.reshape(-1)).unsqueeze(1)              # (B, 1, D)
        c = F.silu(t_emb + self.y_embedder(y).unsqueeze(1))              # (B, 1, D)

        tokens = self.s_embedder(patches)                                 # (B, T, D)
        features = None
        for index, block in enumerate(self.blocks):
            tokens = self._maybe_checkpoint(block, tokens, c, freqs_cis)
            if feature_block is not None and index + 1 == feature_block:
                features = tokens                                         # (B, T, D) after block k

        if self.config.head == "detailer":
            out = self._maybe_checkpoint(self._detail, patches, tokens, t_emb)
        else:
            out = self.final_layer(tokens, c)                             # (B, T, C*P*P)
        v = F.fold(out.transpose(1, 2), (H, W), kernel_size=P, stride=P)  # (B, C, H, W)
        if feature_block is not None:
            if features is None:
                raise ValueError(f"feature_block={feature_block} is outside 1..{len(self.blocks)}")
            return v, features
        return v

    def _detail(self, patches: torch.Tensor, tokens: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        B, T, D = tokens.shape
        C, P = self.config.in_channels, self.config.patch_size
        context = F.silu(t_emb + tokens)                                  # no final linear layer
        repeat = P // 16
        context = context.reshape(B * T, D, 1, 1).repeat(1, 1, repeat, repeat)  # (B*T, D, P/16, P/16)
        local = patches.reshape(B * T, C, P, P)                           # the noisy input patches
        out = self.local_decoder(local, context)                          # (B*T, C, P, P)
        return out.reshape(B, T, C * P * P)
