"""The batch arithmetic of a run: micro-batch x workers x accumulation = the global batch, which stays the
same at every world size of an elastic run (stated at its largest), and its split for each size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config.sections import TrainConfig


@dataclass(frozen=True)
class BatchSplit:
    """micro-batch x workers x accumulation = the global batch, for one world size."""
    micro_batch: int
    world_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch} x {self.world_size} workers x {self.grad_accum} accumulation "
                f"= {self.global_batch} images per step")


def solve_batch_split(global_batch: int, max_micro_batch: int, world_size: int) -> BatchSplit | None:
    """The split of `global_batch` over `world_size` workers with the largest micro-batch <= the
    configured one (memory is sized for it), hence the fewest accumulation steps; None if none exists."""
    if global_batch % world_size:
        return None
    per_worker = global_batch // world_size
    for micro in range(min(max_micro_batch, per_worker), 0, -1):
        if per_worker % micro == 0:
            return BatchSplit(micro, world_size, per_worker // micro)
    return None


def global_batch(cfg: TrainConfig) -> int:
    """Images per optimizer step, the same at every world size: stated at the largest one."""
    return cfg.data.batch_size * cfg.cluster.max_workers * cfg.train.grad_accum


def batch_split(cfg: TrainConfig, world_size: int) -> BatchSplit:
    """How `world_size` workers make up the global batch (re-solved at every (re)start)."""
    total = global_batch(cfg)
    split = solve_batch_split(total, cfg.data.batch_size, world_size)
    if split is None:
        raise ValueError(f"{world_size} workers cannot keep the global batch {total} (data.batch_size="
                         f"{cfg.data.batch_size} x {cfg.cluster.max_workers} workers x train.grad_accum="
                         f"{cfg.train.grad_accum}): it is not a multiple of {world_size}; refusing to train "
                         f"on another global batch")
    return split


def unusable_worker_counts(cfg: TrainConfig) -> list[int]:
    """World sizes inside an elastic range that cannot split the global batch evenly."""
    return [w for w in cfg.cluster.worker_counts()
            if solve_batch_split(global_batch(cfg), cfg.data.batch_size, w) is None]


def batch_arithmetic(cfg: TrainConfig) -> str:
    top = batch_split(cfg, cfg.cluster.max_workers)
    if not cfg.cluster.elastic:
        return top.describe()
    low = batch_split(cfg, cfg.cluster.min_workers)
    text = f"{top.describe()} at {top.world_size} workers; {low.describe()} at {low.world_size}"
    skipped = unusable_worker_counts(cfg)
    if skipped:
        text += (f"; {', '.join(map(str, skipped))} workers cannot keep it: a restart Ray makes with that many "
                 "is refused and retried (cluster.max_failures)")
    return text
