"""`dip plan`: per-GPU memory arithmetic of a training config, for every DeepSpeed ZeRO stage.

Two parts, both plain arithmetic (no GPU, no allocation; parameter counts come from a model built on
the `meta` device):

* Model states per GPU (parameters, gradients, optimizer states, EMA, DeepSpeed buffers; the EMA
  is whole on rank 0 under ZeRO-0/1/2 and partitioned like the weights under ZeRO-3). The
  per-parameter byte counts are what DeepSpeed 0.19.8 allocates with our engine config
  (trainer/loop/engine.py: torch AdamW, contiguous gradients, default bucket sizes), measured on CPU with
  two gloo ranks (tests/test_plan_zero_states.py checks them against live tensors).
* Activations per image: every tensor autograd saves for backward, op by op, for the DiP block,
  the Patch Detailer Head (or the linear head) and the loss, in the training dtype. The peak adds
  what backward holds at once (see `ActivationBreakdown.peak`). tests/test_plan_activations.py
  compares the estimate with the bytes of saved tensors and with the RSS peak measured on CPU.

What is not modelled: cuDNN/NCCL workspaces, allocator fragmentation and the CUDA context, all
covered by a flat `reserve` (default 2 GiB), and the sampling activations of rank 0's periodic sample
grids (inference only; under ZeRO-3 the whole EMA gathered for a grid is counted).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

GiB = 1 << 30
ZERO_STAGES = (0, 1, 2, 3)
PRECISION_BYTES = {"fp32": 4, "bf16": 2}
# DeepSpeed defaults our engine config keeps (deepspeed/runtime/zero/config.py).
REDUCE_BUCKET_ELEMENTS = 500_000_000
STAGE3_PREFETCH_ELEMENTS = 50_000_000
FP32 = 4
INDEX = 8  # int64 max-pool indices


# ----------------------------------------------------------------------------------------------
#                                          Inputs
# ----------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'80GB', '80G', '80GiB', '141 GB', '81920MB' -> bytes. GPU memory is sold in binary units:
    an "80 GB" H100 has 80 GiB of HBM, so GB and GiB both mean 2**30 here."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"--gpu-memory={text!r} is not a size: use e.g. 80GB, 141GB, 24GiB or 81920MB")
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = {"": GiB, "K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40}[unit]
    value = int(number * scale)
    if value <= 0:
        raise ValueError(f"--gpu-memory={text!r} must be > 0")
    return value


@dataclass(frozen=True)
class Hardware:
    gpus: int                    # data-parallel ranks (one per GPU)
    gpu_memory: int              # bytes per GPU
    reserve: int = 2 * GiB       # CUDA context, NCCL/cuDNN workspaces, allocator fragmentation

    def __post_init__(self):
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 1:
            raise ValueError(f"--gpus={self.gpus!r} is not valid: expected an integer >= 1")
        if self.gpu_memory <= 0:
            raise ValueError(f"--gpu-memory={self.gpu_memory!r} is not valid: expected a size > 0")
        if not 0 <= self.reserve < self.gpu_memory:
            raise ValueError(f"--reserve={self.reserve} bytes is not valid: expected 0 <= reserve < gpu memory "
                             f"({self.gpu_memory} bytes)")

    @property
    def usable(self) -> int:
        return self.gpu_memory - self.reserve


# ----------------------------------------------------------------------------------------------
#                                  Activations (bytes per image)
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
#                                  Model states (bytes per GPU)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelStates:
    """Bytes on the busiest GPU (rank 0: the whole EMA under ZeRO-0/1/2, the grids' gathered EMA under ZeRO-3)."""
    params: int          # training-dtype weights (a 1/N partition under ZeRO-3)
    grads: int           # gradient partition + the reduce bucket being filled
    optimizer: int       # fp32 master weights + AdamW m and v (partitioned from ZeRO-1 on)
    ema: int             # fp32 EMA of the denoiser: whole on rank 0 (ZeRO-0/1/2), 1/N on every rank (ZeRO-3)
    frozen: int          # frozen REPA encoder weights (fp32), on every rank
    working: int         # ZeRO-3: parameters gathered for the layer running + the prefetch bucket
    step_transient: int  # between steps: fp32 gradient copies for the step; ZeRO-3: the EMA gathered for a grid

    @property
    def persistent(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema + self.frozen


def model_states(trainable: int, denoiser: int, frozen: int, precision: str, zero_stage: int, gpus: int,
                 largest_module: int) -> ModelStates:
    """DeepSpeed 0.19.8 with our engine config. Per parameter (N ranks, b = 2 in bf16, 4 in fp32):

      ZeRO-0: weights b, gradients b, optimizer 12 (bf16: fp32 master + m + v) or 8 (fp32: m + v)
      ZeRO-1/2: weights b, gradients b/N + the reduce bucket, optimizer 12/N (a fp32 master
                partition is kept even in fp32)
      ZeRO-3: weights b/N, gradients b/N + a reduce bucket of 5e8 elements allocated up front,
              optimizer 12/N, plus the layer being gathered and the prefetch bucket

    The fp32 EMA (trainer/loop/training_ema.py): 4 per denoiser parameter on rank 0 under ZeRO-0/1/2; under
    ZeRO-3 each rank keeps its partition, 4/N, and rank 0 gathers the whole 4 for a sample grid.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage!r} is not valid: choose one of {list(ZERO_STAGES)}")
    b = PRECISION_BYTES[precision]
    n = gpus
    if zero_stage == 0:
        params, grads = b * trainable, b * trainable
        optimizer = (12 if precision == "bf16" else 8) * trainable
        step = FP32 * trainable if precision == "bf16" else 0      # bf16 grads -> fp32 for the step
        working = 0
    elif zero_stage in (1, 2):
        params = b * trainable
        grads = math.ceil(b * trainable / n) + b * min(REDUCE_BUCKET_ELEMENTS, trainable)
        optimizer = math.ceil(12 * trainable / n)
        step = math.ceil(FP32 * trainable / n) if precision == "bf16" else 0
        working = 0
    else:
        params = math.ceil(b * trainable / n)
        grads = math.ceil(b * trainable / n) + b * REDUCE_BUCKET_ELEMENTS
        optimizer = math.ceil(12 * trainable / n)
        working = b * (2 * largest_module + STAGE3_PREFETCH_ELEMENTS)
        # a sample grid (between steps) builds the whole fp32 EMA on rank 0 (ShardedEMA.sampling_module)
        step = max(math.ceil(FP32 * trainable / n) if precision == "bf16" else 0, FP32 * denoiser)
    ema = math.ceil(FP32 * denoiser / n) if zero_stage == 3 else FP32 * denoiser
    return ModelStates(params=params, grads=grads, optimizer=optimizer, ema=ema, frozen=FP32 * frozen,
                       working=working, step_transient=step)


# ----------------------------------------------------------------------------------------------
#                                           The plan
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StagePlan:
    zero_stage: int
    states: ModelStates
    activation_per_image: int       # peak, with the config's activation-checkpointing setting
    activation_per_image_other: int  # the same with checkpointing flipped
    fixed: int                      # everything but the micro-batch's activations
    max_micro_batch: int            # largest micro-batch that fits (0: not even one image)
    max_micro_batch_other: int      # ... with checkpointing flipped
    config_peak: int                # peak at the config's own micro-batch
    fits: bool

    def global_batch(self, gpus: int, grad_accum: int) -> int:
        return self.max_micro_batch * gpus * grad_accum


@dataclass(frozen=True)
class Plan:
    config_name: str
    model_name: str
    resolution: int
    precision: str
    checkpointing: bool
    micro_batch: int
    grad_accum: int
    config_gpus: int
    config_global_batch: int
    trainable: int
    denoiser: int
    frozen: int
    hardware: Hardware
    activations: ActivationBreakdown
    stages: list[StagePlan] = field(default_factory=list)
    config_stage: int = 2

    def stage(self, zero_stage: int) -> StagePlan:
        return next(s for s in self.stages if s.zero_stage == zero_stage)


def count_parameters(cfg) -> tuple[int, int, int, int]:
    """(trainable, denoiser, frozen encoder, largest module's) parameters of a TrainConfig, exactly,
    from models built on the meta device (no memory is allocated)."""
    import torch

    from models import DiP
    from models.repa import REPAProjector

    model_cfg = cfg.model.dip_config()
    with torch.device("meta"):
        denoiser = DiP(model_cfg)
        trainable = denoiser_params = sum(p.numel() for p in denoiser.parameters())
        largest = max(sum(p.numel() for p in block.parameters()) for block in denoiser.blocks)
        frozen = 0
        if cfg.objective.repa_enabled:
            from models.repa import DINOv2Encoder, TinyEncoder

            encoder = TinyEncoder() if cfg.objective.repa_encoder == "tiny" else DINOv2Encoder()
            frozen = sum(p.numel() for p in encoder.parameters())
            trainable += sum(p.numel() for p in REPAProjector(model_cfg.hidden_size, encoder.feature_dim).parameters())
    return trainable, denoiser_params, frozen, largest


def _max_micro_batch(budget: int, per_image: int) -> int:
    return max(0, budget // per_image) if per_image > 0 else 0


def make_plan(cfg, hardware: Hardware, config_name: str = "") -> Plan:
    """The memory plan of a `trainer.config.TrainConfig` on `hardware`, for ZeRO stages 0-3."""
    trainable, denoiser, frozen, largest_module = count_parameters(cfg)
    model_cfg = cfg.model.dip_config()
    precision = cfg.train.precision
    ckpt = bool(cfg.model.activation_checkpointing)
    acts = activation_breakdown(model_cfg, cfg.data.resolution, precision)
    per_image, per_image_other = acts.peak(ckpt), acts.peak(not ckpt)
    micro = cfg.data.batch_size
    stages = []
    for stage in ZERO_STAGES:
        states = model_states(trainable, denoiser, frozen, precision, stage, hardware.gpus, largest_module)
        fixed = states.persistent + states.working
        # after backward the activations are gone; the step's transient must fit on its own
        step_ok = states.persistent + states.step_transient <= hardware.usable
        budget = hardware.usable - fixed
        best = _max_micro_batch(budget, per_image) if step_ok else 0
        best_other = _max_micro_batch(budget, per_image_other) if step_ok else 0
        config_peak = max(fixed + micro * per_image, states.persistent + states.step_transient)
        stages.append(StagePlan(stage, states, per_image, per_image_other, fixed, best, best_other, config_peak,
                                fits=config_peak <= hardware.usable))
    return Plan(config_name=config_name, model_name=cfg.model.name, resolution=cfg.data.resolution,
                precision=precision, checkpointing=ckpt, micro_batch=micro, grad_accum=cfg.train.grad_accum,
                config_gpus=cfg.cluster.max_workers, config_global_batch=cfg.global_batch, trainable=trainable,
                denoiser=denoiser, frozen=frozen, hardware=hardware, activations=acts, stages=stages,
                config_stage=cfg.train.zero_stage)


# ----------------------------------------------------------------------------------------------
#                                           Report
# ----------------------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def format_plan(plan: Plan) -> str:
    hw = plan.hardware
    acts = plan.activations
    ck = "on" if plan.checkpointing else "off"
    lines = [
        f"dip plan: {plan.config_name or plan.model_name} -- {plan.model_name} at {plan.resolution} px, {plan.precision}, "
        f"activation checkpointing {ck}",
        f"hardware: {hw.gpus} GPU(s) x {_gib(hw.gpu_memory)} GiB, {_gib(hw.reserve)} GiB reserved per GPU "
        f"(CUDA context, NCCL/cuDNN workspaces, fragmentation) -> {_gib(hw.usable)} GiB usable",
        f"parameters: {plan.trainable:,} trainable ({plan.denoiser:,} in the denoiser)"
        + (f", {plan.frozen:,} frozen (REPA encoder)" if plan.frozen else ""),
        f"config: micro-batch {plan.micro_batch} x {plan.config_gpus} GPUs x {plan.grad_accum} accumulation = "
        f"{plan.config_global_batch} images per step, ZeRO-{plan.config_stage}",
        "",
        "activations per image (MiB)         no checkpointing   checkpointing",
        f"  held at end of forward            {_mib(acts.saved(False)):>16}   {_mib(acts.saved(True)):>13}",
        f"  peak of the step                  {_mib(acts.peak(False)):>16}   {_mib(acts.peak(True)):>13}",
        f"  of which: {acts.depth} blocks x {_mib(acts.block)} (checkpointed: x {_mib(acts.block_input)}), "
        f"head {_mib(acts.head)}, stem {_mib(acts.stem)}, loss {_mib(acts.loss)}",
        "",
        "per GPU (GiB; rank 0, which keeps the whole EMA under ZeRO-0/1/2 and gathers it for grids under ZeRO-3)",
    ]
    header = ["", *[f"ZeRO-{s.zero_stage}" for s in plan.stages]]
    rows = [
        ("parameters", [s.states.params for s in plan.stages]),
        ("gradients (+ reduce bucket)", [s.states.grads for s in plan.stages]),
        ("optimizer (fp32 master + AdamW)", [s.states.optimizer for s in plan.stages]),
        ("EMA (fp32; ZeRO-3: 1/N per rank)", [s.states.ema for s in plan.stages]),
    ]
    if plan.frozen:
        rows.append(("frozen REPA encoder", [s.states.frozen for s in plan.stages]))
    rows += [
        ("ZeRO-3 gathered layers + prefetch", [s.states.working for s in plan.stages]),
        ("between steps (step; ZeRO-3 grid)", [s.states.step_transient for s in plan.stages]),
        (f"activations x micro-batch {plan.micro_batch}", [plan.micro_batch * s.activation_per_image for s in plan.stages]),
        ("peak at the config's micro-batch", [s.config_peak for s in plan.stages]),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines.append(f"  {header[0]:<{width}}" + "".join(f"{h:>10}" for h in header[1:]))
    for label, values in rows:
        lines.append(f"  {label:<{width}}" + "".join(f"{_gib(v):>10}" for v in values))
    other = "on" if not plan.checkpointing else "off"
    lines.append(f"  {'largest micro-batch (ckpt ' + ck + ')':<{width}}" + "".join(f"{s.max_micro_batch:>10}" for s in plan.stages))
    lines.append(f"  {'global batch (x GPUs x accum)':<{width}}"
                 + "".join(f"{s.global_batch(hw.gpus, plan.grad_accum):>10}" for s in plan.stages))
    lines.append(f"  {'largest micro-batch (ckpt ' + other + ')':<{width}}"
                 + "".join(f"{s.max_micro_batch_other:>10}" for s in plan.stages))
    lines.append("")
    chosen = plan.stage(plan.config_stage)
    for s in plan.stages:
        if s.max_micro_batch == 0:
            lines.append(f"WARNING: ZeRO-{s.zero_stage} does not fit even one image per GPU "
                         f"({_gib(s.fixed)} GiB before activations, {_gib(hw.usable)} GiB usable)")
    if not chosen.fits:
        hint = (f"largest micro-batch that fits: {chosen.max_micro_batch}" if chosen.max_micro_batch else
                "not even one image fits")
        if not plan.checkpointing and chosen.max_micro_batch_other > chosen.max_micro_batch:
            hint += f"; with model.activation_checkpointing=true: {chosen.max_micro_batch_other}"
        lines.append(f"WARNING: the config will not fit: ZeRO-{plan.config_stage} at micro-batch {plan.micro_batch} "
                     f"needs {_gib(chosen.config_peak)} GiB per GPU, {_gib(hw.usable)} GiB usable ({hint})")
    else:
        lines.append(f"the config fits: ZeRO-{plan.config_stage} at micro-batch {plan.micro_batch} needs "
                     f"{_gib(chosen.config_peak)} of {_gib(hw.usable)} GiB usable per GPU "
                     f"(up to micro-batch {chosen.max_micro_batch})")
    target = plan.config_global_batch
    if chosen.max_micro_batch and target % hw.gpus == 0:
        per_gpu = target // hw.gpus
        micro = max((m for m in range(1, min(chosen.max_micro_batch, per_gpu) + 1) if per_gpu % m == 0), default=0)
        if micro:
            lines.append(f"to keep the config's global batch {target} on {hw.gpus} GPU(s) with ZeRO-{plan.config_stage}: "
                         f"data.batch_size={micro} train.grad_accum={per_gpu // micro} cluster.num_workers={hw.gpus}")
    return "\n".join(lines)


def format_elastic_ends(cfg, hardware: Hardware) -> str:
    """An elastic run (cluster.num_workers: [min, max]) at each end of its range: the batch split Ray's
    restarts will use, and whether the config's ZeRO stage fits there (fewer ranks hold bigger shards)."""
    from dataclasses import replace

    lines = [f"elastic: {cfg.cluster.min_workers} to {cfg.cluster.max_workers} workers, global batch {cfg.global_batch}"]
    for workers in sorted({cfg.cluster.min_workers, cfg.cluster.max_workers}):
        split = cfg.batch_split(workers)
        at = cfg.replace(data=cfg.data.replace(batch_size=split.micro_batch),
                         train=cfg.train.replace(grad_accum=split.grad_accum))
        stage = make_plan(at, replace(hardware, gpus=workers)).stage(cfg.train.zero_stage)
        verdict = "fits" if stage.fits else "DOES NOT FIT"
        lines.append(f"  at {workers} worker(s): {split.describe()}; ZeRO-{cfg.train.zero_stage} needs "
                     f"{_gib(stage.config_peak)} of {_gib(hardware.usable)} GiB per GPU: {verdict}")
    return "\n".join(lines)
