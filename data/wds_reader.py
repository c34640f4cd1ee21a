"""Reading webdataset shards for one epoch phase: each DataLoader worker reads its slot's positions.

Tars are parsed with webdataset's own iterators (`tar_file_expander`, `group_by_keys`); remote shards
are first fetched into the run's cache directory (see data/remote.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.records import collate, decode_record
from data.remote import fetch, join
from data.config import is_remote
from data.transforms import CorruptImageError
from data.wds_plan import EpochStream, Interval

log = logging.getLogger(__name__)
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "npy", "img", "bmp", "tif", "tiff", "gif")
MAX_SUBSTITUTES = 64  # consecutive corrupt records before a shard is declared unreadable


class ShardReadError(RuntimeError):
    """A shard that cannot be read at all: names the shard and its URI."""


@dataclass
class WdsSource:
    """Where the epoch's shards are and how their records become samples."""
    root: str                       # the `wds/` directory (local path or URI)
    shard_names: list[str]
    samples_per_shard: list[int]
    cache_dir: str
    timeout_s: float
    resolution: int
    hflip: bool
    seed: int
    shuffle: bool

    def shard_uri(self, shard: int) -> str:
        return join(self.root, self.shard_names[shard])

    def local_path(self, shard: int) -> str:
        if not is_remote(self.root):
            return self.shard_uri(shard)
        return fetch(self.shard_uri(shard), os.path.join(self.cache_dir, "wds", self.shard_names[shard]), self.timeout_s)

    def read_records(self, shard: int, wanted: set[int]) -> dict[int, dict]:
        """File-order index -> raw sample for the wanted records of one shard."""
        import webdataset.tariterators as tars

        uri = self.shard_uri(shard)
        found: dict[int, dict] = {}
        count = 0
        try:
            path = self.local_path(shard)
            with open(path, "rb") as stream:
                files = tars.tar_file_expander([{"url": uri, "stream": stream}])
                for index, sample in enumerate(tars.group_by_keys(files)):
                    count = index + 1
                    if index in wanted:
                        found[index] = sample
        except Exception as err:
            raise ShardReadError(f"cannot read webdataset shard {self.shard_names[shard]!r} at {uri}: "
                                 f"{type(err).__name__}: {err}") from err
        expected = self.samples_per_shard[shard]
        if count != expected:
            raise ShardReadError(f"webdataset shard {self.shard_names[shard]!r} at {uri} holds {count} records, "
                                 f"the manifest says {expected}: the shard is truncated or was replaced")
        return found


def _fields(sample: dict) -> tuple[bytes, int, str]:
    """(image bytes, label, stable key) of a raw webdataset sample; KeyError/ValueError when malformed."""
    image = next(sample[name] for name in IMAGE_FIELDS if name in sample)
    key = sample["key.txt"].decode("utf-8") if "key.txt" in sample else sample["__key__"]
    return image, int(sample["cls"]), key


class WdsSlotDataset(IterableDataset):
    """Yields whole batches `(pixels, labels, keys, meta)` for the slot = DataLoader worker id.

    `slot_plans[w]` lists the positions slot w reads (already past any resumed prefix), and
    `first_batch[w]` the index of its first batch in the phase (tags let the loader put batches in
    round-robin order). A corrupt record's place is taken by the next decodable record of the same
    shard (file order, wrapping): batch shapes and resume positions stay exact.
    """

    def __init__(self, source: WdsSource, epoch: int, slot_plans: list[list[Interval]], first_batch: list[int],
                 batch_size: int) -> None:
        self.source, self.epoch = source, epoch
        self.slot_plans, self.first_batch, self.batch_size = slot_plans, first_batch, batch_size

    def __iter__(self):
        info = get_worker_info()
        slot = info.id if info is not None else 0
        stream = EpochStream(self.source.samples_per_shard, self.source.seed, self.epoch, self.source.shuffle)
        batch: list = []
        batch_index = self.first_batch[slot]
        for shard, records in stream.segments(self.slot_plans[slot]):
            raw = self.source.read_records(shard, set(records))
            for record in records:
                batch.append(self._sample(shard, record, raw))
                if len(batch) == self.batch_size:
                    pixels, labels, keys, corrupt = collate(batch)
                    yield pixels, labels, keys, {"slot": slot, "batch": batch_index, "corrupt": corrupt}
                    batch, batch_index = [], batch_index + 1
        if batch:  # plans are cut to whole batches: a remainder means the plan and the data disagree
            raise RuntimeError(f"internal error: slot {slot} ended with a partial batch of {len(batch)}")

    def _sample(self, shard: int, record: int, raw: dict[int, dict]):
        corrupt: list[str] = []
        count = self.source.samples_per_shard[shard]
        for attempt in range(min(MAX_SUBSTITUTES, count)):
            index = (record + attempt) % count
            if index not in raw:
                raw.update(self.source.read_records(shard, {index}))
            sample = raw[index]
            try:
                data, label, key = _fields(sample)
            except (KeyError, ValueError, StopIteration, UnicodeDecodeError):
                corrupt.append(f"{self.source.shard_names[shard]}#{index}")
                continue
            try:
                pixels = decode_record(data, key, self.source.resolution, self.source.hflip, self.source.seed,
                                       self.epoch)
            except CorruptImageError:
                corrupt.append(key)
                continue
            return pixels, label, key, corrupt
        raise ShardReadError(f"webdataset shard {self.source.shard_names[shard]!r} at "
                             f"{self.source.shard_uri(shard)}: {len(corrupt)} consecutive undecodable records "
                             f"from record {record} (e.g. {corrupt[:3]})")
