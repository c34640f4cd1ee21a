"""The data layer: shard writers, the synthetic source, ADM crop, resumable MDS / webdataset readers.

Imports stay light here (the `dip` CLI imports this package to register `dip data shard`); the
readers and writers load torch, streaming and webdataset when first used.
"""
from __future__ import annotations

from data.config import DataConfig

__all__ = ["DataConfig", "build_dataloader", "prepare_dataset"]


def build_dataloader(config: DataConfig, rank: int, world_size: int):
    """Per-rank endless stream of (pixels uint8 (B, 3, N, N), labels (B,), keys); see data/loader.py.
    Consumers scale to [-1, 1] on their device with data.records.to_pm1."""
    from data.loader import build_dataloader as build

    return build(config, rank, world_size)


def prepare_dataset(config: DataConfig, work_dir: str) -> DataConfig:
    """Run once in the driver: writes synthetic shards / checks real ones; see data/prepare.py."""
    from data.prepare import prepare_dataset as prepare

    return prepare(config, work_dir)
