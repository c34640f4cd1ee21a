"""Deterministic, resumable, elastic epoch plans for webdataset shards (pure logic, no I/O).

webdataset has no resume state, so the order is ours to define and to book-keep:

* Epoch stream. For epoch e the shards are permuted with rng(seed, e) and the records of each shard
  with rng(seed, e, shard). Concatenated, they form the epoch's stream: position p -> (shard,
  record). Records are written in random order, so a shard is already a random sample of classes.
* Phase layout. The positions still to read in this epoch (`remaining`, a list of [start, end)
  intervals) are dealt out contiguously: rank r takes the r-th of W equal ranges (the last ones
  padded by wrapping round, as DistributedSampler does), cut to whole batches; its K DataLoader
  workers ("slots") take contiguous runs of those batches. A rank's batches come round-robin from its
  slots (what a DataLoader does with K workers), so the rank's key sequence is a function of
  (seed, epoch, world size, workers, batch size) only.
* Resume state. All ranks step together, so one count describes everyone: `batches` taken by each
  rank in the current phase. From it each slot's consumed prefix follows, hence the consumed
  positions of every rank. Same (W, K, B) on resume: carry on exactly. Different: the consumed
  positions are removed from `remaining` and a new phase deals out the rest with the new (W, K, B),
  so every record of the epoch is still read once (up to padding and the < B tail of each rank).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

Interval = tuple[int, int]  # [start, end) of epoch-stream positions


@dataclass(frozen=True)
class Phase:
    """One stretch of an epoch read with one (world size, workers, batch size)."""
    world_size: int
    num_workers: int
    batch_size: int
    batches: int = 0  # batches each rank has taken in this phase

    def __post_init__(self) -> None:
        for name in ("world_size", "num_workers", "batch_size"):
            if getattr(self, name) < (0 if name == "num_workers" else 1):
                raise ValueError(f"Phase.{name}={getattr(self, name)} is out of range")
        if self.batches < 0:
            raise ValueError(f"Phase.batches={self.batches} must be >= 0")

    @property
    def slots(self) -> int:
        return max(1, self.num_workers)

    def same_layout(self, other: "Phase") -> bool:
        return (self.world_size, self.slots, self.batch_size) == (other.world_size, other.slots, other.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------- intervals
def total(intervals: list[Interval]) -> int:
    return sum(end - start for start, end in intervals)


def take(intervals: list[Interval], start: int, stop: int) -> list[Interval]:
    """Positions [start, stop) of the concatenation of `intervals`, wrapping round past its end."""
    length = total(intervals)
    if stop <= start or length == 0:
        return []
    out: list[Interval] = []
    offset = start
    while offset < stop:
        lap_start = (offset // length) * length  # wrap-around padding repeats from the beginning
        cursor = lap_start
        for a, b in intervals:
            lo, hi = max(offset, cursor), min(stop, cursor + (b - a))
            if lo < hi:
                out.append((a + lo - cursor, a + hi - cursor))
            cursor += b - a
        offset = lap_start + length
    return merge(out, keep_order=True)


def merge(intervals: list[Interval], keep_order: bool = False) -> list[Interval]:
    """Join touching intervals (sorted first unless `keep_order`)."""
    items = list(intervals) if keep_order else sorted(intervals)
    out: list[Interval] = []
    for a, b in items:
        if a >= b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif not keep_order and out and a < out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def subtract(intervals: list[Interval], removed: list[Interval]) -> list[Interval]:
    """Set difference, keeping the order of `intervals`."""
    cuts = merge(removed)
    out: list[Interval] = []
    for a, b in intervals:
        pieces = [(a, b)]
        for c, d in cuts:
            next_pieces = []
            for x, y in pieces:
                if d <= x or c >= y:
                    next_pieces.append((x, y))
                    continue
                if x < c:
                    next_pieces.append((x, c))
                if d < y:
                    next_pieces.append((d, y))
            pieces = next_pieces
        out.extend(pieces)
    return merge(out, keep_order=True)


# ---------------------------------------------------------------------------------------- layouts
def slot_batch_counts(batches_per_rank: int, slots: int) -> list[int]:
    """Contiguous split of a rank's batches over its slots (counts differ by at most one)."""
    bounds = [w * batches_per_rank // slots for w in range(slots + 1)]
    return [bounds[w + 1] - bounds[w] for w in range(slots)]


def round_robin(counts: list[int]) -> list[tuple[int, int]]:
    """The order a DataLoader takes batches from its workers: (slot, batch index in slot)."""
    return [(w, j) for j in range(max(counts, default=0)) for w in range(len(counts)) if j < counts[w]]


def consumed_per_slot(counts: list[int], batches: int) -> list[int]:
    """Batches each slot had delivered after `batches` batches of round-robin."""
    taken = [0] * len(counts)
    for slot, _ in round_robin(counts)[:batches]:
        taken[slot] += 1
    return taken


@dataclass
class PhaseLayout:
    """What every rank and slot reads in one phase."""
    remaining: list[Interval]
    phase: Phase

    def __post_init__(self) -> None:
        size = total(self.remaining)
        self.per_rank = -(-size // self.phase.world_size) if size else 0  # ceil: pad by wrapping round
        self.batches_per_rank = self.per_rank // self.phase.batch_size
        self.slot_counts = slot_batch_counts(self.batches_per_rank, self.phase.slots)

    def slot_intervals(self, rank: int, slot: int, skip_batches: int = 0) -> list[Interval]:
        """Positions that `slot` of `rank` reads, in order, after skipping its first `skip_batches`."""
        first = sum(self.slot_counts[:slot]) + skip_batches
        last = sum(self.slot_counts[:slot + 1])
        base = rank * self.per_rank
        size = self.phase.batch_size
        return take(self.remaining, base + first * size, base + max(first, last) * size)

    def consumed(self, batches: int) -> list[Interval]:
        """Positions read by all ranks together after each took `batches` batches."""
        done = consumed_per_slot(self.slot_counts, batches)
        out: list[Interval] = []
        for rank in range(self.phase.world_size):
            for slot, count in enumerate(done):
                start = sum(self.slot_counts[:slot])
                base = rank * self.per_rank
                out += take(self.remaining, base + start * self.phase.batch_size,
                            base + (start + count) * self.phase.batch_size)
        return merge(out)


def current_layout(num_samples: int, phases: list[Phase]) -> PhaseLayout:
    """Replay the phases of an epoch: the layout of the last one, on what earlier ones left."""
    if not phases:
        raise ValueError("an epoch needs at least one phase")
    remaining: list[Interval] = [(0, num_samples)] if num_samples else []
    for phase in phases[:-1]:
        layout = PhaseLayout(remaining, phase)
        remaining = subtract(remaining, layout.consumed(phase.batches))
    return PhaseLayout(remaining, phases[-1])


# ------------------------------------------------------------------------------------ epoch stream
class EpochStream:
    """Maps epoch-stream positions to (shard id, record index in that shard's file)."""

    def __init__(self, samples_per_shard: list[int], seed: int, epoch: int, shuffle: bool) -> None:
        self.samples_per_shard = list(samples_per_shard)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        num_shards = len(self.samples_per_shard)
        self.order = np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle \
            else np.arange(num_shards)
        counts = np.array([self.samples_per_shard[s] for s in self.order], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (num_shards + 1,)

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1])

    def record_order(self, shard: int) -> np.ndarray:
        """Order in which a shard's records appear in the stream (a permutation of its file indices)."""
        n = self.samples_per_shard[shard]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, shard, 1]).permutation(n)

    def segments(self, intervals: list[Interval]) -> list[tuple[int, list[int]]]:
        """Split intervals into per-shard runs: [(shard id, [file record indices, in stream order])]."""
        out: list[tuple[int, list[int]]] = []
        for start, end in intervals:
            position = start
            while position < end:
                k = int(np.searchsorted(self.starts, position, side="right")) - 1
                shard = int(self.order[k])
                stop = min(end, int(self.starts[k + 1]))
                local = self.record_order(shard)[position - self.starts[k]: stop - self.starts[k]]
                out.append((shard, [int(i) for i in local]))
                position = stop
        return out
