"""Per-interval training figures: throughput, data-wait share, peak memory, and the MFU hook."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch


def flops_per_image(model_config, resolution: int) -> float | None:
    """Training FLOPs (forward + backward) of one image. The MFU issue fills this in; None = no MFU."""
    return None


def peak_flops_per_second(device: torch.device) -> float | None:
    """The device's practical peak for MFU (see the stack notes: ~780 TFLOP/s bf16 on an H100)."""
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class IntervalMeter:
    """Wall time split into waiting for data and the rest, since the last log line; plus this
    process's CPU time (all its threads), which stays meaningful on an oversubscribed machine."""
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)
    data_wait_s: float = 0.0
    steps: int = 0

    def add(self, data_wait_s: float) -> None:
        self.data_wait_s += data_wait_s
        self.steps += 1

    def figures(self, images_per_step: int, flops_per_img: float | None, peak_flops: float | None,
                world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        images_per_s = images_per_step * self.steps / elapsed
        out = {"images_per_s": images_per_s, "data_wait_share": self.data_wait_s / elapsed,
               "step_time_s": elapsed / max(self.steps, 1),
               "cpu_s_per_step": (time.process_time() - self.cpu_started) / max(self.steps, 1)}
        if flops_per_img is not None and peak_flops:
            out["mfu"] = images_per_s * flops_per_img / (peak_flops * world_size)
        return out

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.data_wait_s = 0.0
        self.steps = 0
