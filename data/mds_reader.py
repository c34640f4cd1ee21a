"""Reading MDS shards with mosaicml-streaming: its partitioning, shuffling, download and resume state.

`DecodingStreamingDataset` only adds our record -> sample step. A corrupt record is replaced by the
next decodable sample id (wrapping): every position still yields one sample, so streaming's resume
arithmetic (samples seen x world size) stays exact, and the corrupt key travels with the batch to
be counted and warned about in the main process. A record that cannot be read at all (its shard was
truncated or replaced under the run) is replaced by a sample of the next shard, and counted under
the shard's name: a damaged shard costs its unreadable samples, never the run.
"""
from __future__ import annotations

import os

from streaming import StreamingDataset

from data.records import decode_record
from data.transforms import CorruptImageError

MAX_SUBSTITUTES = 64
DAMAGED = "{} (damaged shard)"  # the key a damaged shard's unreadable records are counted under


class ShardReadError(RuntimeError):
    """An MDS shard that cannot be read at all: names the shard and its URI."""


class DecodingStreamingDataset(StreamingDataset):
    def __init__(self, *, resolution: int, hflip: bool, seed: int, uri: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.resolution, self.hflip, self.flip_seed, self.uri = resolution, hflip, seed, uri

    def _raw(self, sample_id: int, retry: int) -> dict:
        try:
            return super().get_item(sample_id, retry)
        except Exception as err:
            shard_id, _ = self.spanner[sample_id]
            basename = self.shards[shard_id].raw_data.basename
            raise ShardReadError(f"cannot read MDS shard {basename!r} of {self.uri}: "
                                 f"{type(err).__name__}: {err}") from err

    def get_item(self, sample_id: int, retry: int = 7):
        corrupt: list[str] = []
        epoch = self.next_epoch - 1  # set by streaming before any sample of the epoch is read
        candidate = sample_id
        for _ in range(min(MAX_SUBSTITUTES, self.num_samples)):
            try:
                raw = self._raw(candidate, retry)
            except ShardReadError:
                shard_id, _ = self.spanner[candidate]
                corrupt.append(DAMAGED.format(self.shards[shard_id].raw_data.basename))
                candidate = self._in_next_shard(candidate)
                continue
            key = raw.get("key", f"#{candidate}")
            try:
                pixels = decode_record(raw["image"], key, self.resolution, self.hflip, self.flip_seed, epoch)
            except (CorruptImageError, KeyError):
                corrupt.append(key)
                candidate = (candidate + 1) % self.num_samples
                continue
            return pixels, int(raw["label"]), key, corrupt
        shard_id, _ = self.spanner[sample_id]
        raise ShardReadError(f"MDS shard {self.shards[shard_id].raw_data.basename!r} of {self.uri}: "
                             f"{len(corrupt)} consecutive unreadable or undecodable records from sample "
                             f"{sample_id} (e.g. {corrupt[:3]})")

    def _in_next_shard(self, sample_id: int) -> int:
        """The sample at the same relative position (wrapped) in the next shard: a damaged shard's
        substitutes are spread over its neighbour rather than all taken from one record."""
        shard_id, relative = self.spanner[sample_id]
        following = (shard_id + 1) % len(self.shards)
        size = int(self.samples_per_shard[following])
        return int(self.sample_offset_per_shard[following]) + relative % size


def mds_local_and_remote(root: str, remote: bool, cache_dir: str) -> tuple[str, str | None]:
    """streaming's (local, remote) pair for our `mds/` directory."""
    if remote:
        return os.path.join(cache_dir, "mds"), root.rstrip("/") + "/mds"
    return os.path.join(root, "mds"), None
