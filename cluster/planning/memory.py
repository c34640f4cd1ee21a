"""The plan: model states per GPU for every ZeRO stage (what DeepSpeed 0.19.8 allocates with our
engine config; tests/test_plan_zero_states.py checks them against live tensors), plus the activations
(cluster/planning/activations.py), against the hardware: the largest micro-batch that fits."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from cluster.planning.activations import FP32, PRECISION_BYTES, ActivationBreakdown, activation_breakdown

GiB = 1 << 30
ZERO_STAGES = (0, 1, 2, 3)
# DeepSpeed defaults our engine config keeps (deepspeed/runtime/zero/config.py).
REDUCE_BUCKET_ELEMENTS = 500_000_000
STAGE3_PREFETCH_ELEMENTS = 50_000_000


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
