"""Activations per image: every tensor autograd saves for backward, op by op, for the DiP block, the
Patch Detailer Head (or the linear head) and the loss, in the training dtype, and the peak of the
step (`ActivationBreakdown.peak`). tests/test_plan_activations.py checks the estimate against the
bytes of saved tensors and the RSS peak measured on CPU."""
from __future__ import annotations

from dataclasses import dataclass

PRECISION_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
INDEX = 8  # int64 max-pool indices


@dataclass(frozen=True)
class ActivationBreakdown:
    """Bytes per image of what autograd keeps between forward and backward, by part of the network."""
    stem: int           # the unfolded patches (saved by the patch Linear) and the t / label embeddings
    block: int          # one transformer block, everything it saves
    block_input: int    # what a checkpointed block keeps instead: its input tokens
    block_largest: int  # the block's largest saved tensor (the qkv output or the SwiGLU hidden)
    depth: int
    head: int           # the output head on all of the image's patches (+ its context)
    head_input: int     # what the head keeps under checkpointing (the detailer keeps its input tokens;
                        # the linear head is never checkpointed, so it keeps everything)
    head_largest: int   # the head's largest saved tensor
    loss: int           # fp32 prediction and target for the MSE

    @property
    def largest(self) -> int:
        return max(self.block_largest, self.head_largest)

    def saved(self, checkpointing: bool) -> int:
        """Bytes held at the end of forward."""
        if checkpointing:
            return self.stem + self.depth * self.block_input + self.head_input + self.loss
        return self.stem + self.depth * self.block + self.head + self.loss

    def peak(self, checkpointing: bool) -> int:
        """Peak of the training step, the largest of three moments of backward (which runs loss ->
        head -> last block -> ... -> first block, freeing each part's tensors once it is done):

          loss backward:   everything saved + the gradients of the prediction and of the head's
                           output (image-sized, fp32: as large as the loss's own tensors)
          head backward:   stem + all blocks + the head (recomputed in full under checkpointing)
                           + the gradients of the head's largest tensor and of its input
          last block:      stem + the other blocks + this block (recomputed under checkpointing)
                           + the gradients of the block's largest tensor and of its input
        """
        blocks_kept = self.block_input if checkpointing else self.block
        head_checkpointed = checkpointing and self.head_input < self.head
        loss_phase = self.saved(checkpointing) + self.loss
        head_phase = (self.stem + self.depth * blocks_kept + self.head
                      + (self.head_input if head_checkpointed else 0) + 2 * self.head_largest)
        block_phase = (self.stem + (self.depth - 1) * blocks_kept + self.block
                       + (self.block_input if checkpointing else 0) + 2 * self.block_largest)
        return max(loss_phase, head_phase, block_phase)


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    return int(2 * int(hidden_size * mlp_ratio) / 3)  # as models/dip.py SwiGLU


def block_saved_bytes(tokens: int, hidden: int, heads: int, mlp_hidden: int, b: int) -> int:
    """One DiPBlock, per image. `b` is the activation dtype's size; RMSNorm and RoPE work in fp32.

    Per (T, D) tensor:
      RMSNorm x2: its fp32 input (the input itself in fp32, a copy in bf16) + the normalised value (b)
      modulate x2: norm * weight (b) and the modulated input of the next Linear (b)
      qkv output (3b): v is saved by attention and is a view of it, so all of it stays
      q/k RMSNorm: fp32 copy (none in fp32: it aliases qkv) + normalised (b), for q and k
      rotated q, k (2b) and the attention output (b; proj's input is a view of it)
      attention and MLP outputs saved by their gate multiplications (2b)
    Per (T, F): SwiGLU saves w1 x, SiLU(w1 x), w3 x and their product (4b).
    Small: RMSNorm reciprocals, attention log-sum-exp (fp32), adaLN outputs and the condition.
    """
    td = tokens * hidden
    fp32_copy = 0 if b == FP32 else FP32
    per_td = (2 * (FP32 + b)            # norm1, norm2
              + 2 * 2 * b               # two modulates
              + 3 * b                   # qkv output
              + 2 * (fp32_copy + b)     # q_norm, k_norm
              + 2 * b + b               # rotated q, k; attention output (= proj input)
              + 2 * b)                  # gated attention and MLP outputs
    small = (2 * tokens * FP32                 # RMSNorm reciprocals (norm1, norm2)
             + 2 * tokens * heads * FP32       # q/k RMSNorm reciprocals
             + heads * tokens * FP32           # attention log-sum-exp
             + 14 * hidden * b)                # condition, adaLN output and its chunks
    return per_td * td + 4 * b * tokens * mlp_hidden + small


def detailer_head_saved_bytes(tokens: int, hidden: int, patch: int, channels: int, b: int) -> tuple[int, int]:
    """PatchDetailerHead on all `tokens` patches of one image: (saved bytes, largest tensor bytes).

    Each conv saves its input, each SiLU its input, each max-pool its input and int64 indices,
    each ConvTranspose its input; the skip concatenations are new tensors saved by the next conv.
    """
    widths = (64, 128, 256, 512)
    elements, indices, largest = 0, 0, 0
    in_ch, side = channels, patch
    skips = []
    for width in widths:                                   # encoder: conv -> SiLU -> pool
        area = side * side
        elements += in_ch * area + 2 * width * area        # conv input, conv output, SiLU output
        indices += width * (side // 2) ** 2
        largest = max(largest, width * area)
        skips.append((width, side))
        in_ch, side = width, side // 2
    context_side = patch // 16
    bottleneck_area = context_side * context_side
    elements += (512 + hidden) * bottleneck_area + 2 * 512 * bottleneck_area  # concat, conv out, SiLU out
    up_in = 512
    for (skip_ch, skip_side), out_ch in zip(reversed(skips), (256, 128, 64, 64)):   # decoder
        area = skip_side * skip_side
        concat = (up_in + skip_ch) * area                  # upsampled + skip, saved by the conv
        elements += concat + 2 * out_ch * area             # conv output, SiLU output
        largest = max(largest, concat)
        up_in = out_ch
    context = hidden * b                                   # SiLU(t_emb + tokens), per token
    per_patch = elements * b + indices * INDEX + context
    return tokens * per_patch, tokens * largest * b


def activation_breakdown(model, resolution: int, precision: str) -> ActivationBreakdown:
    """Activation bytes per image of a `models.dip.DiPConfig` trained at `resolution` in `precision`."""
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision={precision!r} is not valid: choose one of {list(PRECISION_BYTES)}")
    if resolution % model.patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the patch size {model.patch_size}")
    b = PRECISION_BYTES[precision]
    P, D, C = model.patch_size, model.hidden_size, model.in_channels
    T = (resolution // P) ** 2
    F = swiglu_hidden(D, model.mlp_ratio)
    patch_features = T * C * P * P
    block = block_saved_bytes(T, D, model.num_heads, F, b)
    if model.head == "detailer":
        head, head_largest = detailer_head_saved_bytes(T, D, P, C, b)
        head_input = T * D * b + patch_features * b  # checkpoint keeps its inputs: tokens, unfolded patches
    else:
        # LayerNorm input + normalised (+ stats), modulate, then the Linear's input; not checkpointed
        head, head_largest = 3 * T * D * b + 2 * T * FP32, T * C * P * P * b
        head_input = head
    stem = patch_features * b + 6 * D * b + 256 * FP32
    pixels = C * resolution * resolution
    loss = 2 * pixels * FP32
    return ActivationBreakdown(stem=stem, block=block, block_input=T * D * b,
                               block_largest=max(T * F * b, 3 * T * D * b), depth=model.depth, head=head,
                               head_input=head_input, head_largest=head_largest, loss=loss)
