"""Reading webdataset shards for one epoch phase: each DataLoader worker reads its slot's positions.

Tars are parsed with webdataset's own iterators (`tar_file_expander`, `group_by_keys`); remote shards
are first fetched into the run's cache directory (see data/remote.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from torch.utils.data import IterableDataset, get_worker_info

from data.records import collate, decode_record
from data.remote import fetch, join
from data.config import is_remote
from data.transforms import CorruptImageError
from data.wds_plan import EpochStream, Interval

log = logging.getLogger(__name__)
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "npy", "img", "bmp", "tif", "tiff", "gif")
MAX_SUBSTITUTES = 64  # consecutive corrupt records before a shard is declared unreadable
SPARE_RECORDS = 64    # records of a neighbouring shard kept to stand in for a damaged shard's unreadable ones
DAMAGED = "{} (damaged shard)"  # the key a damaged shard's unreadable records are counted under


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
    # shard -> records it still holds, for shards found truncated or replaced (per reading process)
    damaged: dict[int, int] = field(default_factory=dict)

    def shard_uri(self, shard: int) -> str:
        return join(self.root, self.shard_names[shard])

    def local_path(self, shard: int) -> str:
        if not is_remote(self.root):
            return self.shard_uri(shard)
        return fetch(self.shard_uri(shard), os.path.join(self.cache_dir, "wds", self.shard_names[shard]), self.timeout_s)

    def read_records(self, shard: int, wanted: set[int]) -> dict[int, dict]:
        """File-order index -> raw sample for the wanted records of one shard. A shard that is truncated
        or was replaced gives what it still holds and is noted in `damaged`; one that cannot be fetched
        raises ShardReadError."""
        import webdataset.tariterators as tars

        uri = self.shard_uri(shard)
        try:
            path = self.local_path(shard)
        except Exception as err:
            raise ShardReadError(f"cannot fetch webdataset shard {self.shard_names[shard]!r} at {uri}: "
                                 f"{type(err).__name__}: {err}") from err
        found: dict[int, dict] = {}
        count, problem = 0, None
        try:
            with open(path, "rb") as stream:
                files = tars.tar_file_expander([{"url": uri, "stream": stream}])
                for index, sample in enumerate(tars.group_by_keys(files)):
                    count = index + 1
                    if index in wanted:
                        found[index] = sample
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        expected = self.samples_per_shard[shard]
        if problem is None and count != expected:
            problem = f"it holds {count} records, the manifest says {expected}"
        if problem is not None and shard not in self.damaged:
            self.damaged[shard] = count
            log.warning("webdataset shard %r at %s is damaged (%s): its unreadable records are skipped, "
                        "counted and replaced by records of the next shard", self.shard_names[shard], uri, problem)
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
    shard (file order, wrapping); a record a damaged (truncated, replaced) shard no longer holds, by
    a record of the next shard: batch shapes and resume positions stay exact.
    """

    def __init__(self, source: WdsSource, epoch: int, slot_plans: list[list[Interval]], first_batch: list[int],
                 batch_size: int) -> None:
        self.source, self.epoch = source, epoch
        self.slot_plans, self.first_batch, self.batch_size = slot_plans, first_batch, batch_size
        self._spares: dict[int, list] = {}  # damaged shard -> [(raw sample, (shard, index))] standing in

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
            if index not in raw and shard not in self.source.damaged:
                raw.update(self.source.read_records(shard, {index}))
            if index not in raw:  # the shard no longer holds it
                corrupt.append(DAMAGED.format(self.source.shard_names[shard]))
                return self._spare_sample(shard, record, corrupt)
            decoded = self._decode(raw[index], shard, index, corrupt)
            if decoded is not None:
                return (*decoded, corrupt)
        raise ShardReadError(f"webdataset shard {self.source.shard_names[shard]!r} at "
                             f"{self.source.shard_uri(shard)}: {len(corrupt)} consecutive undecodable records "
                             f"from record {record} (e.g. {corrupt[:3]})")

    def _decode(self, sample: dict, shard: int, index: int, corrupt: list[str]):
        """(pixels, label, key), or None with the record's key added to `corrupt`."""
        try:
            data, label, key = _fields(sample)
        except (KeyError, ValueError, StopIteration, UnicodeDecodeError):
            corrupt.append(f"{self.source.shard_names[shard]}#{index}")
            return None
        try:
            pixels = decode_record(data, key, self.source.resolution, self.source.hflip, self.source.seed, self.epoch)
        except CorruptImageError:
            corrupt.append(key)
            return None
        return pixels, label, key

    def _spare_sample(self, shard: int, record: int, corrupt: list[str]):
        """A stand-in for an unreadable record of a damaged shard: one of the first records of the next
        shard that still reads (read once per process), chosen by the record's position."""
        if shard not in self._spares:
            names = self.source.shard_names
            for step in range(1, len(names)):
                other = (shard + step) % len(names)
                if self.source.damaged.get(other) == 0:
                    continue
                window = set(range(min(SPARE_RECORDS, self.source.samples_per_shard[other])))
                found = self.source.read_records(other, window)
                if found:
                    self._spares[shard] = [(found[i], (other, i)) for i in sorted(found)]
                    break
            else:
                raise ShardReadError(f"no readable shard left in {self.source.root}: every shard is damaged")
        spares = self._spares[shard]
        for attempt in range(len(spares)):
            sample, (other, index) = spares[(record + attempt) % len(spares)]
            decoded = self._decode(sample, other, index, corrupt)
            if decoded is not None:
                return (*decoded, corrupt)
        raise ShardReadError(f"webdataset shard {self.source.shard_names[shard]!r} is damaged and none of the "
                             f"records standing in for it decodes (e.g. {corrupt[:3]})")
