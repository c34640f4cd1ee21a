"""`prepare_dataset`: run once by the driver before any worker starts."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid

from data.config import DataConfig, is_remote
from data.remote import default_cache_dir, read_json
from data.writer import MANIFEST, check_shards

SYNTHETIC_VERSION = 1  # bump when data.synthetic's pictures change, so old caches are not reused


def synthetic_cache_dir(config: DataConfig, work_dir: str) -> str:
    """Where the synthetic shards for these parameters live (keyed by everything that changes them)."""
    params = {"version": SYNTHETIC_VERSION, "images": config.synthetic_images, "classes": config.synthetic_classes,
              "resolution": config.resolution, "seed": config.seed, "format": config.format}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(work_dir, "data_cache", f"synthetic-{digest}")


def _write_synthetic(config: DataConfig, target: str) -> None:
    from data.sources import SyntheticSource
    from data.writer import ShardOptions, write_shards

    # Write beside the target and rename: a killed run never leaves a half-written cache to reuse.
    staging = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    source = SyntheticSource(config.synthetic_images, config.synthetic_classes, config.resolution, config.seed)
    # One process up to 20k images (~a minute at 64 px): forking a driver that runs Ray threads is best avoided.
    workers = 1 if config.synthetic_images <= 20000 else max(1, min(os.cpu_count() or 1, 8))
    write_shards(source, ShardOptions(out=staging, format=config.format, shard_size=8 << 20, workers=workers,
                                      order_seed=config.seed, progress=False))
    try:
        os.replace(staging, target)
    except OSError:  # somebody else finished first: theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)


def prepare_dataset(config: DataConfig, work_dir: str) -> DataConfig:
    """Synthetic: generate and shard once into work_dir (reused when the parameters match) and point
    the config at it. Real data: check that the shard directory or remote index is there. Remote data
    also gets a per-run cache directory that every rank on a node will agree on."""
    if config.is_synthetic:
        target = synthetic_cache_dir(config, work_dir)
        if not os.path.exists(os.path.join(target, MANIFEST)):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            for name in os.listdir(os.path.dirname(target)):  # leftovers of a killed writer
                if name.startswith(os.path.basename(target) + ".tmp-"):
                    shutil.rmtree(os.path.join(os.path.dirname(target), name), ignore_errors=True)
            _write_synthetic(config, target)
        return config.replace(path=target)

    remote = is_remote(config.path)
    if not remote and not os.path.isdir(config.path):
        raise FileNotFoundError(f"data.path={config.path!r} does not exist (expected a `dip data shard` output "
                                f"directory, a remote URI like s3://bucket/prefix, or 'synthetic')")
    if not remote and not os.path.exists(os.path.join(config.path, MANIFEST)):
        raise FileNotFoundError(f"data.path={config.path!r} has no {MANIFEST}: not a `dip data shard` output "
                                f"directory{_what_it_holds(config.path)}")
    cache_dir = config.cache_dir
    if remote and not cache_dir:
        cache_dir = default_cache_dir(config.path, run_token=uuid.uuid4().hex)
    with tempfile.TemporaryDirectory(prefix="dip-data-check-") as scratch:
        manifest = read_json(config.path, MANIFEST, scratch, config.download_timeout_s)
        if config.format not in manifest.get("formats", []):
            raise ValueError(f"data.format={config.format!r} but {config.path} holds {manifest.get('formats')}: "
                             f"choose one of those, or shard again with --format {config.format}")
        if config.format == "mds":
            read_json(config.path, "mds/index.json", os.path.join(scratch, "mds"), config.download_timeout_s)
    if not manifest.get("num_samples"):
        raise ValueError(f"data.path={config.path!r} holds no samples ({len(manifest.get('skipped', []))} "
                         "undecodable source file(s) were skipped when it was sharded)")
    if not remote:  # a truncated or missing shard: said now, not by a worker hours into the run
        check_shards(config.path, manifest, [config.format])
    return config.replace(cache_dir=cache_dir)


def _what_it_holds(path: str) -> str:
    """A hint for a directory that is not a shard set: empty, or raw images to shard first."""
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    if not entries:
        return " (it is empty)"
    if any(os.path.isdir(os.path.join(path, e)) for e in entries):
        return (f" (it looks like a folder of images: shard it first, e.g. `dip data shard --src {path} "
                f"--out {path.rstrip(os.sep)}-shards`, then data.path={path.rstrip(os.sep)}-shards)")
    return ""
