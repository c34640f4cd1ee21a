"""`dip plan --mtbf-hours`: the checkpoint interval that maximises goodput at a failure rate, the goodput to
expect, and the time to train the config's steps. Plain arithmetic, every input a number the caller states.

The failure model (Daly 2006, "A higher order estimate of the optimum checkpoint interval for restart dumps"):
failures arrive at random (exponential) with the whole job's MTBF M; a checkpoint blocks training for C
seconds; a failure costs R seconds of restart (detection, Ray's restart, start-up, checkpoint load: the
ledger's `recovery` per failure) plus the work since the last checkpoint.

  job MTBF       M = per-GPU MTBF / GPUs: one failing GPU stops the whole data-parallel job, and a
                 per-GPU figure carries over between job sizes (e.g. Meta's Llama 3 run: 419 interruptions
                 in 54 days on 16,384 GPUs, about 51,000 h per GPU)
  interval       tau = sqrt(2CM) * (1 + sqrt(C/(2M))/3 + (C/(2M))/9) - C   for C < 2M, else M
                 (compute seconds between checkpoint starts; Daly's higher-order Young estimate)
  goodput        tau / (M * exp(R/M) * (exp((tau + C)/M) - 1))  (Daly's expected wall time per
                 solve second, inverted): what failures and checkpoints leave; start-up, data waits and
                 evals come on top and are not modelled here
  step time      global batch * training FLOPs per image / (GPUs * peak * MFU)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

HOUR = 3600.0


def job_mtbf_s(per_gpu_mtbf_hours: float, gpus: int) -> float:
    if not per_gpu_mtbf_hours > 0:
        raise ValueError(f"--mtbf-hours={per_gpu_mtbf_hours!r} is not valid: expected hours > 0 (per GPU)")
    return per_gpu_mtbf_hours * HOUR / gpus


def optimal_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly's higher-order estimate of the compute time between checkpoints that maximises goodput."""
    if checkpoint_s <= 0:
        raise ValueError(f"--checkpoint-cost-s={checkpoint_s!r} is not valid: expected seconds > 0")
    if checkpoint_s >= 2 * mtbf_s:
        return mtbf_s
    ratio = checkpoint_s / (2 * mtbf_s)
    return math.sqrt(2 * checkpoint_s * mtbf_s) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - checkpoint_s


def expected_goodput(interval_s: float, checkpoint_s: float, restart_s: float, mtbf_s: float) -> float:
    """The share of wall time that is kept work, with checkpoints every interval_s of compute (Daly's model)."""
    wall_per_solve = mtbf_s * math.exp(restart_s / mtbf_s) * math.expm1((interval_s + checkpoint_s) / mtbf_s)
    return interval_s / wall_per_solve


def step_time_s(global_batch: int, flops_per_image: float, gpus: int, peak_tflops: float, mfu: float) -> float:
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu={mfu!r} is not valid: expected a fraction in (0, 1], e.g. 0.4")
    return global_batch * flops_per_image / (gpus * peak_tflops * 1e12 * mfu)


@dataclass(frozen=True)
class GoodputPlan:
    gpus: int
    per_gpu_mtbf_hours: float
    checkpoint_s: float
    restart_s: float
    checkpoint_s_given: bool
    restart_s_given: bool
    gpu_kind: str
    peak_tflops: float
    mfu: float
    steps: int
    global_batch: int
    flops_per_image: float
    config_every_steps: int

    @property
    def mtbf_s(self) -> float:
        return job_mtbf_s(self.per_gpu_mtbf_hours, self.gpus)

    @property
    def step_s(self) -> float:
        return step_time_s(self.global_batch, self.flops_per_image, self.gpus, self.peak_tflops, self.mfu)

    @property
    def interval_s(self) -> float:
        return optimal_interval_s(self.checkpoint_s, self.mtbf_s)

    @property
    def interval_steps(self) -> int:
        return max(1, round(self.interval_s / self.step_s))

    def goodput_every(self, steps: int) -> float:
        return expected_goodput(steps * self.step_s, self.checkpoint_s, self.restart_s, self.mtbf_s)

    @property
    def compute_s(self) -> float:
        return self.steps * self.step_s


def make_goodput_plan(cfg, *, gpus: int, mtbf_hours: float, checkpoint_s: float | None, restart_s: float | None,
                      mfu: float, gpu_kind: str) -> GoodputPlan:
    """The plan for a config. checkpoint_s / restart_s None: the defaults below, printed as assumed."""
    from trainer.loop.step_metrics import flops_per_image
    from trainer.tracking.mfu import KNOWN_GPU_KINDS, peak_for_device_name

    peak = peak_for_device_name(gpu_kind)
    if peak is None:
        raise ValueError(f"--gpu-kind={gpu_kind!r} is not a known GPU: use one of {', '.join(KNOWN_GPU_KINDS)}")
    return GoodputPlan(
        gpus=gpus, per_gpu_mtbf_hours=mtbf_hours,
        checkpoint_s=DEFAULT_CHECKPOINT_S if checkpoint_s is None else checkpoint_s,
        restart_s=DEFAULT_RESTART_S if restart_s is None else restart_s,
        checkpoint_s_given=checkpoint_s is not None, restart_s_given=restart_s is not None,
        gpu_kind=peak.kind, peak_tflops=peak.bf16_dense_tflops, mfu=mfu, steps=cfg.train.max_steps,
        global_batch=cfg.global_batch, flops_per_image=flops_per_image(cfg),
        config_every_steps=cfg.checkpoint.every_steps)


# Defaults when not given: a snapshot to host memory of a few GB per GPU, and a Ray restart with a
# checkpoint load. Both are printed as assumptions; measure them (see format_goodput_plan).
DEFAULT_CHECKPOINT_S = 10.0
DEFAULT_RESTART_S = 180.0


def _hours(seconds: float) -> str:
    return f"{seconds / HOUR:,.1f} h" if seconds >= HOUR else f"{seconds / 60:,.1f} min"


def format_goodput_plan(plan: GoodputPlan) -> str:
    given = {True: "given", False: "assumed"}
    best, current = plan.goodput_every(plan.interval_steps), plan.goodput_every(plan.config_every_steps)
    wall_s = plan.compute_s / best
    lines = [
        "",
        "goodput plan (failures and checkpoints; start-up, data waits and evals not included):",
        f"  job MTBF                 {_hours(plan.mtbf_s):>12}   = {plan.per_gpu_mtbf_hours:,.0f} h per GPU (--mtbf-hours) "
        f"/ {plan.gpus} GPUs",
        f"  checkpoint cost C        {plan.checkpoint_s:>10.1f} s   {given[plan.checkpoint_s_given]} "
        "(--checkpoint-cost-s; measured: MLflow checkpoint_blocking_s)",
        f"  restart cost R           {plan.restart_s:>10.1f} s   {given[plan.restart_s_given]} "
        "(--restart-s; measured: badput/recovery_s per failure)",
        f"  step time                {plan.step_s:>10.3f} s   = {plan.global_batch} images x "
        f"{plan.flops_per_image / 1e9:,.1f} GFLOP / ({plan.gpus} x {plan.gpu_kind} {plan.peak_tflops:,.0f} TFLOP/s "
        f"bf16 x MFU {plan.mfu:.2f} (--mfu))",
        f"  best interval            {_hours(plan.interval_s):>12}   = checkpoint.every_steps={plan.interval_steps} "
        "(Daly's higher-order Young estimate)"
        + (" -- longer than train.max_steps: a failure is unlikely within this run" if plan.interval_steps >= plan.steps
           else ""),
        f"  expected goodput         {100 * best:>10.1f} %   at that interval; {100 * current:.1f}% at this config's "
        f"checkpoint.every_steps={plan.config_every_steps}",
        f"  time to train            {_hours(wall_s):>12}   {plan.steps:,} steps: {_hours(plan.compute_s)} of compute "
        f"/ {100 * best:.1f}% goodput ({plan.gpus * wall_s / HOUR:,.0f} GPU-hours)",
    ]
    return "\n".join(lines)
