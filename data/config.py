"""`DataConfig`: everything the data layer needs to know about one run's input stream."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import field_validator

from data.config_model import ConfigModel, Flag, IntAtLeast, NumberIn, Text

FORMATS = ("mds", "wds")
SYNTHETIC = "synthetic"
REMOTE_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "hf", "http", "https", "dbfs", "sftp")


def is_remote(path: str) -> bool:
    """True for `scheme://...` URIs that the readers download through a cache."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme in REMOTE_SCHEMES


class DataConfig(ConfigModel):
    """Where the shards are and how each rank batches them.

    `path` is a shard directory, a remote URI (s3://bucket/prefix, gs://...), or "synthetic" for the
    built-in generated dataset (turned into real shards by `data.prepare_dataset`).
    """

    section: ClassVar[str] = "data"

    path: Text = SYNTHETIC
    format: Literal["mds", "wds"] = "mds"    # mosaicml-streaming | webdataset tars
    resolution: IntAtLeast(8) = 64            # training resolution N: batches are (B, 3, N, N)
    batch_size: IntAtLeast(1) = 32            # per-rank micro-batch
    num_workers: IntAtLeast(0) = 2            # DataLoader worker processes per rank; 0 = read in-process
    hflip: Flag = True                        # random horizontal flip, seeded per (seed, epoch, key)
    seed: IntAtLeast(0) = 0                   # order and flips are a function of (seed, epoch, world size)
    cache_dir: Text = ""                      # local cache for remote shards; "" = a per-run default
    shuffle: Flag = True
    synthetic_images: IntAtLeast(1) = 2000    # images generated when path == "synthetic"
    synthetic_classes: IntAtLeast(1) = 10
    pin_memory: Flag | None = None            # None = on when CUDA is available
    prefetch_factor: IntAtLeast(1) = 2        # batches prefetched per worker
    download_timeout_s: NumberIn(gt=0.0) = 120.0  # per remote file
    # MDS: mosaicml-streaming's canonical node count, which fixes the global sample order. 0 = the node
    # count at the run's first start (kept in the resume state after that). A run whose node count
    # changes (elastic) needs a value that every node count divides or is divided by.
    canonical_nodes: IntAtLeast(0) = 0

    @field_validator("path")
    @classmethod
    def _known_scheme(cls, path: str) -> str:
        if "://" in path and not is_remote(path):
            scheme = path.split("://", 1)[0]
            raise ValueError(
                f"data.path={path!r}: unsupported URI scheme {scheme!r}; valid: a local directory, "
                f"{SYNTHETIC!r}, or one of {[s + '://' for s in REMOTE_SCHEMES]}")
        return path

    @property
    def is_synthetic(self) -> bool:
        return self.path == SYNTHETIC
