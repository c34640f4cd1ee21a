"""What an eval is asked (SamplingSpec) and what it answers (EvalResult)."""
from __future__ import annotations

import dataclasses

import numpy as np

METHODS = ("euler", "heun")


@dataclasses.dataclass
class SamplingSpec:
    """How to draw the evaluation samples. Sample i uses seed f(seed, i) and label i % num_classes,
    so the samples (and the result) do not depend on how the work is split or retried."""
    steps: int = 100
    method: str = "euler"
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    timeshift: float = 1.0
    num_samples: int = 10_000
    seed: int = 0
    batch_size: int = 64
    num_classes: int | None = None   # None: the checkpoint's model config decides
    image_size: int = 256            # DiP has no fixed resolution: say which one to sample

    def __post_init__(self):
        self.cfg_interval = tuple(float(v) for v in self.cfg_interval)
        if self.method not in METHODS:
            raise ValueError(f"SamplingSpec.method={self.method!r}: must be one of {METHODS}")
        for name, minimum in (("steps", 1), ("num_samples", 2), ("batch_size", 1), ("image_size", 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"SamplingSpec.{name}={value!r}: must be an integer >= {minimum}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"SamplingSpec.num_classes={self.num_classes!r}: must be a positive integer or None")
        if len(self.cfg_interval) != 2 or not 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0:
            raise ValueError(f"SamplingSpec.cfg_interval={self.cfg_interval!r}: must be (lo, hi) "
                             "with 0 <= lo <= hi <= 1")
        if not self.cfg_scale >= 0:
            raise ValueError(f"SamplingSpec.cfg_scale={self.cfg_scale!r}: must be >= 0")
        if not self.timeshift > 0:
            raise ValueError(f"SamplingSpec.timeshift={self.timeshift!r}: must be > 0")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SamplingSpec.seed={self.seed!r}: must be a non-negative integer")

    def chunks(self) -> list[tuple[int, int]]:
        """The fixed work units [start, stop): one sampler batch each, whoever runs it."""
        return [(s, min(s + self.batch_size, self.num_samples)) for s in range(0, self.num_samples, self.batch_size)]


@dataclasses.dataclass
class EvalResult:
    step: int | None                 # the checkpoint's training step (None offline when unknown)
    fid: float
    sfid: float | None               # None when the reference has no spatial statistics
    precision: float | None          # None when the reference has no features / images
    recall: float | None
    num_samples: int
    seconds: float
    sample_grid: np.ndarray          # uint8 (h, w, 3): the first samples, tiled, for logging
    checkpoint: str = ""
    actor_restarts: int = 0          # eval actors that died and were replaced during this eval

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """The numbers to log (unavailable ones are left out, never faked)."""
        values = {"fid": self.fid, "sfid": self.sfid, "precision": self.precision, "recall": self.recall,
                  "seconds": self.seconds}
        return {prefix + k: float(v) for k, v in values.items() if v is not None}


def sample_grid(images: np.ndarray, max_images: int = 16) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 image tiling the first max_images in a near-square grid."""
    images = images[:max_images]
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid
