"""What identifies a run's config (`config_hash`) and which changes a resume may take
(`resume_incompatibilities`): anything but the model's shapes, the REPA projector, the ZeRO stage and
the global batch."""
from __future__ import annotations

import dataclasses
import hashlib
import json

from trainer.config.overrides import config_from_dict, to_dict
from trainer.config.sections import TrainConfig


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def shape_signature(cfg: TrainConfig) -> dict:
    """What a checkpoint's tensors depend on: a resume with a different signature cannot load."""
    model = dataclasses.asdict(cfg.model.dip_config())
    model.pop("activation_checkpointing")  # recomputation changes no shape
    model.pop("init")  # nor do the starting weights
    return {"model": model, "repa": cfg.objective.repa_encoder if cfg.objective.repa_enabled else None}


def resume_incompatibilities(saved: dict, cfg: TrainConfig) -> list[str]:
    """Why a checkpoint saved with config dict `saved` cannot resume under `cfg` ([] = it can)."""
    old = config_from_dict(saved)
    problems = []
    old_sig, new_sig = shape_signature(old), shape_signature(cfg)
    for key in sorted(set(old_sig["model"]) | set(new_sig["model"])):
        a, b = old_sig["model"].get(key), new_sig["model"].get(key)
        if a != b:
            problems.append(f"model shape differs: {key} was {a!r}, now {b!r}")
    if old_sig["repa"] != new_sig["repa"]:
        problems.append(f"REPA projector differs: objective.repa_encoder was {old_sig['repa']!r}, "
                        f"now {new_sig['repa']!r}")
    if old.train.zero_stage != cfg.train.zero_stage:
        problems.append(f"train.zero_stage was {old.train.zero_stage}, now {cfg.train.zero_stage}: "
                        "DeepSpeed shards of one ZeRO stage do not load into another")
    if old.global_batch != cfg.global_batch:
        problems.append(f"the global batch was {old.global_batch} ({old.batch_arithmetic()}), now {cfg.global_batch} "
                        f"({cfg.batch_arithmetic()}): the learning-rate schedule and the data position count in "
                        f"global batches; to keep it, {_keep_global_batch(old.global_batch, cfg)}")
    return problems


def _keep_global_batch(target: int, cfg: TrainConfig) -> str:
    """The one-key changes that give `cfg` the global batch `target` (for the resume refusal)."""
    workers, micro, accum = cfg.cluster.max_workers, cfg.data.batch_size, cfg.train.grad_accum
    options = []
    if target % (micro * workers) == 0:
        options.append(f"train.grad_accum={target // (micro * workers)}")
    if target % (workers * accum) == 0:
        options.append(f"data.batch_size={target // (workers * accum)}")
    if target % (micro * accum) == 0:
        options.append(f"cluster.num_workers={target // (micro * accum)}")
    return "set " + " or ".join(options) if options else \
        f"choose data.batch_size x cluster.num_workers x train.grad_accum = {target}"
