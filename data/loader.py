"""`build_dataloader`: one resumable, endless batch stream per rank over MDS or webdataset shards.

Iterating yields `(pixels float32 (B, 3, N, N) in [-1, 1], labels int64 (B,), keys list[str])`
forever; `epoch` advances by itself. `state_dict()` holds plain ints/strings/lists only and is the
same on every rank (all ranks step together), so saving rank 0's copy is enough to resume them all.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import warnings

import torch
from torch.utils.data import DataLoader

from data.config import DataConfig, is_remote
from data.records import collate
from data.remote import (cache_root, clean_stale_caches, default_cache_dir, read_json, register_cache_user,
                         release_cache_user)
from data.shm import clean_stale_streaming_state, one_registration_at_a_time
from data.wds_plan import Phase, consumed_per_slot, current_layout, round_robin
from data.writer import MANIFEST, DamagedShardsError, damaged_shards

log = logging.getLogger(__name__)
STATE_VERSION = 1


class CorruptSampleWarning(UserWarning):
    """A record that does not decode was skipped (its key is in the message)."""


def _dataloader_kwargs(config: DataConfig) -> dict:
    pin = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
    kwargs = {"num_workers": config.num_workers, "pin_memory": pin}
    if config.num_workers > 0:
        # fork: streaming's workers must share its shared-memory state (and spawn is slow); see stack notes
        kwargs.update(multiprocessing_context="fork", prefetch_factor=config.prefetch_factor)
    return kwargs


def _set_world_env(rank: int, world_size: int) -> None:
    """streaming reads the world from RANK / WORLD_SIZE / LOCAL_* (Ray Train and torchrun set them).

    Checked against the arguments; filled in only for world_size > 1 (streaming's defaults are one
    process), so a single-process loader leaves the environment of its host process alone."""
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size)):
        current = os.environ.get(name)
        if current is not None and int(current) != value:
            raise ValueError(f"build_dataloader(rank={rank}, world_size={world_size}) disagrees with the "
                             f"environment {name}={current}")
    if world_size == 1:
        return
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    local_world = int(os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size)))
    os.environ.setdefault("LOCAL_RANK", str(rank % local_world))
    if world_size % local_world:
        raise ValueError(f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_world}")


class _WdsBackend:
    """webdataset tars with our own (seed, epoch, phase, batches) bookkeeping (see data/wds_plan.py)."""

    def __init__(self, config: DataConfig, rank: int, world_size: int, root: str, cache_dir: str,
                 manifest: dict) -> None:
        from data.wds_reader import WdsSource

        shards = manifest["shards"]["wds"]
        self.config, self.rank = config, rank
        self.source = WdsSource(root=root.rstrip("/") + "/wds" if is_remote(root) else os.path.join(root, "wds"),
                                shard_names=[s["name"] for s in shards],
                                samples_per_shard=[int(s["samples"]) for s in shards],
                                cache_dir=cache_dir, timeout_s=config.download_timeout_s,
                                resolution=config.resolution, hflip=config.hflip, seed=config.seed,
                                shuffle=config.shuffle)
        self.num_samples = sum(self.source.samples_per_shard)
        self.layout_now = Phase(world_size, config.num_workers, config.batch_size)
        self.epoch, self.phases = 0, [self.layout_now]

    def batches(self):
        from data.wds_reader import WdsSlotDataset

        layout = current_layout(self.num_samples, self.phases)
        done = consumed_per_slot(layout.slot_counts, self.phases[-1].batches)
        plans = [layout.slot_intervals(self.rank, slot, done[slot]) for slot in range(self.layout_now.slots)]
        dataset = WdsSlotDataset(self.source, self.epoch, plans, done, self.config.batch_size)
        loader = DataLoader(dataset, batch_size=None, **_dataloader_kwargs(self.config))
        stream, pending = iter(loader), {}
        try:
            for slot, index in round_robin(layout.slot_counts)[self.phases[-1].batches:]:
                # DataLoader already interleaves workers round-robin; the buffer only matters when a
                # resumed phase starts mid-round, and keeps the order exact either way.
                while (slot, index) not in pending:
                    pixels, labels, keys, meta = next(stream)
                    pending[(meta["slot"], meta["batch"])] = (pixels, labels, keys, meta["corrupt"])
                batch = pending.pop((slot, index))
                self.phases[-1] = dataclasses.replace(self.phases[-1], batches=self.phases[-1].batches + 1)
                yield batch
        finally:
            del stream  # shuts the workers down
        self.epoch, self.phases = self.epoch + 1, [self.layout_now]

    def state_dict(self) -> dict:
        return {"format": "wds", "epoch": self.epoch, "phases": [p.to_dict() for p in self.phases],
                "num_samples": self.num_samples, "seed": self.config.seed, "shuffle": self.config.shuffle}

    def load_state_dict(self, state: dict) -> None:
        _check_same(state, "num_samples", self.num_samples, "the shards changed since the state was saved")
        _check_same(state, "seed", self.config.seed, "data.seed must match the saved run")
        _check_same(state, "shuffle", self.config.shuffle, "data.shuffle must match the saved run")
        phases = [Phase(**p) for p in state["phases"]]
        if not phases[-1].same_layout(self.layout_now):
            # Elastic resume: the rest of the epoch is dealt out again over the new world / workers / batch.
            log.warning("data: resuming epoch %d with world_size=%d, workers=%d, batch=%d (saved: %d, %d, %d): "
                        "the epoch's remaining samples are re-partitioned", state["epoch"], self.layout_now.world_size,
                        self.layout_now.num_workers, self.layout_now.batch_size, phases[-1].world_size,
                        phases[-1].num_workers, phases[-1].batch_size)
            phases.append(self.layout_now)
        self.epoch, self.phases = int(state["epoch"]), phases

    def close(self) -> None:
        pass


class _MdsBackend:
    """MDS shards through mosaicml-streaming (its partition, shuffle, download and elastic resume)."""

    def __init__(self, config: DataConfig, rank: int, world_size: int, root: str, cache_dir: str,
                 manifest: dict) -> None:
        import torch.distributed as dist

        from data.mds_reader import DecodingStreamingDataset, mds_local_and_remote

        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("data.format='mds' with world_size > 1 needs torch.distributed initialized first "
                             "(mosaicml-streaming synchronises the ranks of a node with barriers)")
        _set_world_env(rank, world_size)
        self.config, self.world_size = config, world_size
        local, remote = mds_local_and_remote(root, is_remote(root), cache_dir)
        nodes = world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        with one_registration_at_a_time(rank == 0, dist.barrier if world_size > 1 else None):
            self.dataset = DecodingStreamingDataset(
                resolution=config.resolution, hflip=config.hflip, seed=config.seed, uri=remote or local,
                local=local, remote=remote, batch_size=config.batch_size, shuffle=config.shuffle,
                shuffle_seed=config.seed, num_canonical_nodes=config.canonical_nodes or nodes,
                download_timeout=config.download_timeout_s)
        self.epoch = 0
        self.offset = 0   # global samples of this epoch consumed before this process resumed it
        self.yielded = 0  # samples this rank yielded in this epoch since then

    def batches(self):
        loader = DataLoader(self.dataset, batch_size=self.config.batch_size, collate_fn=collate,
                            **_dataloader_kwargs(self.config))
        stream = iter(loader)
        try:
            for batch in stream:
                self.yielded += len(batch[2])
                yield batch
        finally:
            del stream
        self.epoch, self.offset, self.yielded = self.epoch + 1, 0, 0

    def state_dict(self) -> dict:
        state = self.dataset.state_dict(self.offset + self.yielded * self.world_size, from_beginning=True)
        state.update(format="mds", epoch=self.epoch, seed=self.config.seed, shuffle=self.config.shuffle)
        return state

    def load_state_dict(self, state: dict) -> None:
        _check_same(state, "seed", self.config.seed, "data.seed must match the saved run")
        _check_same(state, "shuffle", self.config.shuffle, "data.shuffle must match the saved run")
        keys = ("epoch", "sample_in_epoch", "num_canonical_nodes", "shuffle_seed", "initial_physical_nodes")
        self.dataset.load_state_dict({k: state[k] for k in keys})
        # A loader that has iterated already (a rollback re-positions it mid-run): streaming's own epoch
        # counter has moved past the state's epoch, and it would take the state for a stale one.
        self.dataset.next_epoch = int(state["epoch"])
        self.epoch, self.offset, self.yielded = int(state["epoch"]), int(state["sample_in_epoch"]), 0

    def close(self) -> None:
        """Unlink the shared memory this rank created now, not at interpreter exit."""
        from streaming.base.shared import SharedMemory

        def release(obj, depth: int) -> None:
            # streaming wraps its segments in SharedScalar / SharedArray / SharedBarrier objects
            if isinstance(obj, SharedMemory):
                obj.cleanup()
                atexit.unregister(obj.cleanup)  # a second cleanup at exit could unlink a later run's segment
            elif depth and type(obj).__module__.startswith("streaming.base.shared"):
                for value in vars(obj).values():
                    release(value, depth - 1)

        for value in list(vars(self.dataset).values()):
            release(value, 3)
        # streaming never removes its filelocks; once the prefix's segments are gone, neither may anyone else
        from data.shm import remove_orphan_filelocks

        remove_orphan_filelocks(self.dataset._shm_prefix_int)
        if hasattr(self.dataset, "_executor"):
            self.dataset._executor.shutdown(wait=False, cancel_futures=True)


def _warn_damaged(root: str, manifest: dict, fmt: str) -> None:
    """A run goes on past shards damaged under it (their unreadable samples are skipped and counted);
    only a shard set with nothing left to read is an error."""
    problems = damaged_shards(root, manifest, [fmt])
    if len(problems) == len(manifest["shards"][fmt]):
        raise DamagedShardsError(f"{root}: every {fmt} shard is damaged ({problems[0]}, ...): nothing left to read")
    if problems:
        log.warning("data: %d damaged shard(s) in %s (%s): their unreadable samples are skipped and counted",
                    len(problems), root, "; ".join(problems[:3]))


def _check_same(state: dict, key: str, value, why: str) -> None:
    if key in state and state[key] != value:
        raise ValueError(f"data loader state has {key}={state[key]!r} but this run has {value!r}: {why}")


class ShardLoader:
    """The per-rank loader returned by `build_dataloader` (see the module docstring)."""

    def __init__(self, config: DataConfig, rank: int, world_size: int) -> None:
        if not isinstance(config, DataConfig):
            raise ValueError(f"config must be a DataConfig, got {type(config).__name__}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if config.is_synthetic:
            raise ValueError("data.path='synthetic' must go through data.prepare_dataset(config, work_dir) "
                             "first: it writes the shards and returns a config pointing at them")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.corrupt_samples = 0
        self._warned: set[str] = set()
        self._batches = None
        self._empty_epochs = 0
        clean_stale_streaming_state()
        clean_stale_caches()

        root = config.path
        remote = is_remote(root)
        if not remote and not os.path.isdir(root):
            raise FileNotFoundError(f"data.path={root!r} is not a directory (a `dip data shard` output, a remote "
                                    f"URI, or 'synthetic')")
        # Caches under our default root are per-run (ours to remove at close); a user's cache_dir is kept.
        self._own_cache = remote and (not config.cache_dir or os.path.abspath(config.cache_dir).startswith(
            cache_root() + os.sep))
        self.cache_dir = config.cache_dir or (default_cache_dir(root) if remote else "")
        self._cache_marker = register_cache_user(self.cache_dir) if self._own_cache else ""
        manifest = read_json(root, MANIFEST, os.path.join(self.cache_dir, "meta") if remote else "",
                             config.download_timeout_s)
        if config.format not in manifest.get("formats", []):
            raise ValueError(f"data.format={config.format!r} but {root} holds {manifest.get('formats')}: "
                             f"choose one of those, or shard again with --format {config.format}")
        if not remote:  # damaged since the driver checked them (a restart after a shard was truncated mid-run)
            _warn_damaged(root, manifest, config.format)
        self.manifest = manifest
        self._closed = False
        backend = _MdsBackend if config.format == "mds" else _WdsBackend
        self._backend = backend(config, rank, world_size, root, self.cache_dir, manifest)

    @property
    def epoch(self) -> int:
        return self._backend.epoch

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if self._closed:
            raise RuntimeError("this data loader was closed")
        while True:
            if self._batches is None:
                self._batches, self._epoch_batches = self._backend.batches(), 0
            try:
                pixels, labels, keys, corrupt = next(self._batches)
            except StopIteration:
                self._batches = None
                self._empty_epochs = self._empty_epochs + 1 if self._epoch_batches == 0 else 0
                if self._empty_epochs >= 2:
                    raise RuntimeError(
                        f"{self.config.path}: an epoch of {self.num_samples} samples gives no batch of "
                        f"{self.config.batch_size} per rank at world_size={self.world_size}: use fewer ranks, "
                        f"a smaller batch_size, or more data") from None
                continue
            self._epoch_batches += 1
            self._count_corrupt(corrupt)
            return pixels, labels, keys

    def _count_corrupt(self, corrupt: list[str]) -> None:
        self.corrupt_samples += len(corrupt)
        for key in corrupt:
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(f"data: skipped corrupt sample {key!r} in {self.config.path}", CorruptSampleWarning,
                              stacklevel=3)

    def state_dict(self) -> dict:
        state = self._backend.state_dict()
        state.update(version=STATE_VERSION, corrupt_samples=self.corrupt_samples, world_size=self.world_size)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != self.config.format:
            raise ValueError(f"data loader state is for format {state.get('format') if isinstance(state, dict) else state!r}, "
                             f"this loader reads {self.config.format!r}")
        self._reset_epoch_iterator()
        self._backend.load_state_dict(state)
        self.corrupt_samples = int(state.get("corrupt_samples", 0))

    def _reset_epoch_iterator(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def close(self) -> None:
        """Stop the workers and release shared memory and the default remote cache."""
        if getattr(self, "_closed", True):
            return  # closed already, or __init__ failed before there was anything to release
        self._closed = True
        self._reset_epoch_iterator()
        if hasattr(self, "_backend"):
            self._backend.close()
        if getattr(self, "_own_cache", False):
            release_cache_user(self.cache_dir, self._cache_marker)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone; nothing left to release
            log.debug("data loader close at exit failed", exc_info=True)


def build_dataloader(config: DataConfig, rank: int, world_size: int) -> ShardLoader:
    """The per-rank endless batch stream. `path="synthetic"` needs `prepare_dataset` first."""
    return ShardLoader(config, rank, world_size)
