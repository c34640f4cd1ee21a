"""`DataConfig`: everything the data layer needs to know about one run's input stream."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FORMATS = ("mds", "wds")
SYNTHETIC = "synthetic"
REMOTE_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "hf", "http", "https", "dbfs", "sftp")


def is_remote(path: str) -> bool:
    """True for `scheme://...` URIs that the readers download through a cache."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme in REMOTE_SCHEMES


@dataclass
class DataConfig:
    """Where the shards are and how each rank batches them.

    `path` is a shard directory, a remote URI (s3://bucket/prefix, gs://...), or "synthetic" for the
    built-in generated dataset (turned into real shards by `data.prepare_dataset`).
    """

    path: str = SYNTHETIC
    format: str = "mds"                # "mds" (mosaicml-streaming) | "wds" (webdataset tars)
    resolution: int = 64               # training resolution N: batches are (B, 3, N, N)
    batch_size: int = 32               # per-rank micro-batch
    num_workers: int = 2               # DataLoader worker processes per rank; 0 = read in-process
    hflip: bool = True                 # random horizontal flip, seeded per (seed, epoch, key)
    seed: int = 0                      # order and flips are a function of (seed, epoch, world size)
    cache_dir: str = ""                # local cache for remote shards; "" = a per-run default
    shuffle: bool = True
    synthetic_images: int = 2000       # images generated when path == "synthetic"
    synthetic_classes: int = 10
    pin_memory: bool | None = None     # None = on when CUDA is available
    prefetch_factor: int = 2           # batches prefetched per worker
    download_timeout_s: float = 120.0  # per remote file
    # MDS: mosaicml-streaming's canonical node count, which fixes the global sample order. 0 = the node
    # count at the run's first start (kept in the resume state after that). A run whose node count
    # changes (elastic) needs a value that every node count divides or is divided by.
    canonical_nodes: int = 0

    def __post_init__(self) -> None:
        _check_type(self, "path", str)
        _check_type(self, "cache_dir", str)
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} is not valid: choose one of {list(FORMATS)}")
        if "://" in self.path and not is_remote(self.path):
            scheme = self.path.split("://", 1)[0]
            raise ValueError(
                f"data.path={self.path!r}: unsupported URI scheme {scheme!r}; valid: a local directory, "
                f"{SYNTHETIC!r}, or one of {[s + '://' for s in REMOTE_SCHEMES]}")
        _check_int(self, "resolution", minimum=8)
        _check_int(self, "batch_size", minimum=1)
        _check_int(self, "num_workers", minimum=0)
        _check_int(self, "seed", minimum=0)
        _check_int(self, "synthetic_images", minimum=1)
        _check_int(self, "synthetic_classes", minimum=1)
        _check_int(self, "prefetch_factor", minimum=1)
        _check_int(self, "canonical_nodes", minimum=0)
        for name in ("hflip", "shuffle"):
            _check_type(self, name, bool)
        if self.pin_memory is not None:
            _check_type(self, "pin_memory", bool)
        if not (isinstance(self.download_timeout_s, (int, float)) and self.download_timeout_s > 0):
            raise ValueError(f"data.download_timeout_s={self.download_timeout_s!r} is not valid: a number > 0")

    @property
    def is_synthetic(self) -> bool:
        return self.path == SYNTHETIC

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)


def _check_type(config: DataConfig, name: str, kind: type) -> None:
    value = getattr(config, name)
    if not isinstance(value, kind):
        raise ValueError(f"data.{name}={value!r} is not valid: expected a {kind.__name__}")


def _check_int(config: DataConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{name}={value!r} is not valid: expected an integer >= {minimum}")
