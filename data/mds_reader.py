"""Reading MDS shards with mosaicml-streaming: its partitioning, shuffling, download and resume state.

`DecodingStreamingDataset` only adds our record -> sample step. A corrupt record is replaced by the
next decodable sample id (wrapping): every position still yields one sample, so streaming's resume
arithmetic (samples seen x world size) stays exact, and the corrupt key travels with the batch to
be counted and warned about in the main process.
"""
from __future__ import annotations

import os

from streaming import StreamingDataset

from data.records import decode_record
from data.transforms import CorruptImageError

MAX_SUBSTITUTES = 64


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
        for attempt in range(min(MAX_SUBSTITUTES, self.num_samples)):
            raw = self._raw((sample_id + attempt) % self.num_samples, retry)
            key = raw.get("key", f"#{(sample_id + attempt) % self.num_samples}")
            try:
                pixels = decode_record(raw["image"], key, self.resolution, self.hflip, self.flip_seed, epoch)
            except (CorruptImageError, KeyError):
                corrupt.append(key)
                continue
            return pixels, int(raw["label"]), key, corrupt
        shard_id, _ = self.spanner[sample_id]
        raise ShardReadError(f"MDS shard {self.shards[shard_id].raw_data.basename!r} of {self.uri}: "
                             f"{len(corrupt)} consecutive undecodable records from sample {sample_id} "
                             f"(e.g. {corrupt[:3]})")


def mds_local_and_remote(root: str, remote: bool, cache_dir: str) -> tuple[str, str | None]:
    """streaming's (local, remote) pair for our `mds/` directory."""
    if remote:
        return os.path.join(cache_dir, "mds"), root.rstrip("/") + "/mds"
    return os.path.join(root, "mds"), None
