"""What `dip plan` prints: the plan's table and verdicts, and an elastic run's two ends."""
from __future__ import annotations

from cluster.planning.memory import GiB, Hardware, Plan, make_plan


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
