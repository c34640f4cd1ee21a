"""What DeepSpeed trains, and how: the objective module, the DeepSpeed config, the engine."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.config import BatchSplit, TrainConfig
from trainer.loop.nonfinite import guard_plain_optimizer


class DiffusionObjective(nn.Module):
    """DiP (+ the REPA projector) with the flow-matching loss as forward, so DeepSpeed owns all of it.

    The frozen REPA encoder is deliberately *not* a submodule: ZeRO would partition and checkpoint
    its weights, and it is never trained. It is reached through `self._repa`, which DeepSpeed
    does not see; the projector inside it is registered, so it is trained and saved.
    """

    def __init__(self, denoiser: nn.Module, objective, repa=None):
        super().__init__()
        self.denoiser = denoiser
        self.objective = objective
        if repa is not None:
            self.repa_projector = repa.projector
        object.__setattr__(self, "_repa", repa)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor, draws=None):
        # pixels (B, 3, N, N) in [-1, 1]; labels (B,); draws: models.transport.Draws (B,)
        # -> (scalar loss, dict of detached parts)
        return self.objective.loss(self.denoiser, pixels, labels, draws=draws, repa=self._repa)

    def move_frozen_encoder(self, device: torch.device) -> None:
        if self._repa is not None:
            self._repa.encoder.to(device)


def build_objective_module(cfg: TrainConfig) -> DiffusionObjective:
    """The DiP of cfg.model, seeded by cfg.train.seed so every rank builds identical weights."""
    from models import DiP
    from models.transport import FlowMatching

    torch.manual_seed(cfg.train.seed)
    model_cfg = cfg.model.dip_config()
    denoiser = DiP(model_cfg)
    objective = FlowMatching(num_classes=model_cfg.num_classes, label_dropout=cfg.objective.label_dropout,
                             t_mean=cfg.objective.t_mean, t_std=cfg.objective.t_std)
    repa = None
    if cfg.objective.repa_enabled:
        from models.repa import REPA, TinyEncoder, load_repa_encoder

        encoder = TinyEncoder() if cfg.objective.repa_encoder == "tiny" else load_repa_encoder(cfg.objective.repa_encoder)
        repa = REPA(encoder, model_cfg.hidden_size, encoder.feature_dim, block=cfg.objective.repa_block,
                    weight=cfg.objective.repa_weight)
    return DiffusionObjective(denoiser, objective, repa)


def deepspeed_config(cfg: TrainConfig, split: BatchSplit) -> dict:
    """The DeepSpeed JSON config of a run at one world size (`split`: its share of the global batch)."""
    zero: dict = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)  # overlap buys nothing on gloo/CPU
    return {
        "train_micro_batch_size_per_gpu": split.micro_batch,
        "gradient_accumulation_steps": split.grad_accum,
        "train_batch_size": split.global_batch,
        "zero_optimization": zero,
        # said, not left to DeepSpeed's default: a bf16 step with a non-finite gradient norm is skipped on
        # every rank (trainer.loop.nonfinite); tests/test_nonfinite.py checks it under ZeRO-1/2/3
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True},
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no 45 s CPU-Adam JIT build
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
    }


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    params = [p for p in module.parameters() if p.requires_grad]
    # fused: one kernel over each tensor instead of ~10 elementwise passes with parameter-sized
    # temporaries; ZeRO hands the optimizer one flat partition, where the unfused step took 2-3x as
    # long on CPU (benchmarks/RESULTS.md, "Trainer"). CUDA and CPU both have the kernel.
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=True)
    warmup = cfg.optim.warmup_steps
    # linear warmup, then constant (the paper trains at a constant 1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def skip_shared_memory_inference_op() -> None:
    """DeepSpeed's comm backend JIT-compiles a C++ shared-memory op when it comes up on CPU (1 to 6
    minutes of g++ in every fresh environment, and again whenever two kinds of process build it with
    different flags). Only its tensor-parallel *inference* all-reduce uses it; training never does,
    so we mark it unavailable and the backend comes up on gloo alone, in seconds."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(cfg: TrainConfig, module: DiffusionObjective, split: BatchSplit):
    """deepspeed.initialize on an already-initialised process group (Ray Train sets it up)."""
    import deepspeed

    skip_shared_memory_inference_op()
    optimizer, scheduler = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, split), dist_init_required=False)
    guard_plain_optimizer(engine)  # a non-finite step is skipped under every ZeRO stage (trainer.loop.nonfinite)
    module.move_frozen_encoder(engine.device)
    return engine
