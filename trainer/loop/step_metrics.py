"""Per-interval training figures: throughput, data-wait share, peak memory, achieved TFLOP/s and MFU."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch

from trainer.config import REPA_TINY, TrainConfig
from trainer.tracking.mfu import mfu_report


def flops_per_image(cfg: TrainConfig) -> float:
    """Training FLOPs (forward + backward, models.flops conventions) of one image of this run: its DiP
    at its resolution, plus REPA's encoder forward and projector when REPA is on. Counted on the meta
    device: instant, no weights."""
    from models.flops import dip_flops, repa_training_flops

    model_config = cfg.model.dip_config()
    resolution = cfg.data.resolution
    total = dip_flops(model_config, resolution).training
    if cfg.objective.repa_enabled:
        from models.repa import DINOv2Encoder, TinyEncoder

        # the architecture trainer.loop.engine builds (weights do not change FLOPs, so none are loaded)
        with torch.device("meta"):
            encoder = TinyEncoder() if cfg.objective.repa_encoder == REPA_TINY else DINOv2Encoder()
        tokens = (resolution // model_config.patch_size) ** 2
        total += repa_training_flops(encoder, model_config.hidden_size, tokens, resolution)
    return float(total)


def compute_text(figures: dict[str, float]) -> str:
    """The status line's compute part: "0.0123 TFLOP/s/dev" and, where a peak is known, "MFU 41.2%"."""
    if "tflops_per_s" not in figures:
        return "TFLOP/s n/a"
    text = f"{figures['tflops_per_s']:.3g} TFLOP/s/dev"
    return text + (f" MFU {100 * figures['mfu']:.1f}%" if "mfu" in figures else "")


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

    def figures(self, images_per_step: int, flops_per_img: float | None, device_name: str | None,
                world_size: int) -> dict[str, float]:
        """Per-interval figures. With flops_per_img: `tflops_per_s` (achieved, per device) and, where
        the device kind has a known peak (trainer.tracking.mfu; not a CPU), `mfu` and `mfu_practical`: absent,
        never zero or made up, where there is none."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        images_per_s = images_per_step * self.steps / elapsed
        out = {"images_per_s": images_per_s, "data_wait_share": self.data_wait_s / elapsed,
               "step_time_s": elapsed / max(self.steps, 1),
               "cpu_s_per_step": (time.process_time() - self.cpu_started) / max(self.steps, 1)}
        if flops_per_img is not None:
            report = mfu_report(flops_per_img, images_per_s, num_devices=world_size,
                                device_name_override=device_name or "cpu")
            out["tflops_per_s"] = report["achieved_tflops"]
            out.update({key: report[key] for key in ("mfu", "mfu_practical") if report[key] is not None})
        return out

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.data_wait_s = 0.0
        self.steps = 0
