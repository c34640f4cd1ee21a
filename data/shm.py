"""Remove mosaicml-streaming shared memory and filelocks that a killed run left behind, and register
a dataset's shared memory one job at a time per machine.

`streaming.base.util.clean_stale_shared_memory()` unlinks every streaming segment on the machine,
including those of live runs beside ours (other jobs, other tests). We remove a segment only when
no live process maps it and it is older than a grace period, and a prefix's filelocks only when
none of that prefix's segments is left.
"""
from __future__ import annotations

import glob
import os
import re
import tempfile
import time
from contextlib import contextmanager

SHM_DIR = "/dev/shm"
_SEGMENT = re.compile(r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|"
                      r"resume|epoch_shape|epoch_data)$")
_FILELOCK = re.compile(r"^(\d{6})_(barrier_filelock|cache_filelock)$")


def streaming_segments() -> list[str]:
    """Names of streaming's shared-memory segments that exist now."""
    if not os.path.isdir(SHM_DIR):
        return []
    return sorted(name for name in os.listdir(SHM_DIR) if _SEGMENT.match(name))


def _mapped_shm_names() -> set[str]:
    """Every /dev/shm name some readable live process maps or holds open."""
    names: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as handle:
                for line in handle:
                    index = line.find("/dev/shm/")
                    if index >= 0:
                        names.add(line[index + 9:].split()[0])
        except OSError:  # the process ended, or is not ours to read
            continue
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            for fd in os.listdir(fd_dir):
                target = os.readlink(os.path.join(fd_dir, fd))
                if target.startswith("/dev/shm/"):
                    names.add(target[9:].split()[0])
        except OSError:
            continue
    return names


def clean_stale_streaming_state(grace_s: float = 5.0) -> list[str]:
    """Unlink unmapped, old streaming segments and their orphaned filelocks; returns what was removed."""
    if not os.path.isdir(SHM_DIR):
        return []
    in_use = _mapped_shm_names()
    now = time.time()
    removed = []
    for name in streaming_segments():
        path = os.path.join(SHM_DIR, name)
        try:
            if name in in_use or now - os.stat(path).st_mtime < grace_s:
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    live_prefixes = {_SEGMENT.match(name).group(1) for name in streaming_segments()}
    lock_dir = tempfile.gettempdir()
    for name in os.listdir(lock_dir):
        match = _FILELOCK.match(name)
        if not match or match.group(1) in live_prefixes:
            continue
        path = os.path.join(lock_dir, name)
        try:
            if now - os.stat(path).st_mtime >= grace_s:
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def remove_orphan_filelocks(prefix_int: int) -> None:
    """Delete streaming's filelocks of one prefix if none of that prefix's segments is left."""
    prefix = f"{prefix_int:06d}_"
    if any(name.startswith(prefix) for name in streaming_segments()):
        return  # another rank of ours still holds the prefix
    for name in ("barrier_filelock", "cache_filelock"):
        try:
            os.unlink(os.path.join(tempfile.gettempdir(), prefix + name))
        except FileNotFoundError:
            pass


REGISTRATION_LOCK = os.path.join(tempfile.gettempdir(), "dip-streaming-prefix.lock")


@contextmanager
def one_registration_at_a_time(holds_lock: bool, barrier=None):
    """Around the construction of a StreamingDataset: no other job whose first rank runs on this
    machine registers a shared-memory prefix meanwhile. streaming's ranks each pick the first free
    prefix and the node's leader then creates it; two jobs starting together pick the same one
    (FileExistsError '/000000_locals' for a leader, 'does not match local leader' for the others).
    The job's rank 0 (`holds_lock`) holds a machine-wide file lock (released by the kernel if the
    process dies) from before any rank of its job looks until after every rank has registered;
    `barrier` (torch.distributed's, when several ranks) keeps the other ranks from looking before it
    holds it. One holder per job: the leaders of several nodes of one job on one machine (Ray's
    simulated nodes in the tests) would otherwise wait on each other's lock across the barrier. So
    the guard covers jobs on rank 0's machine, the usual case of several jobs sharing a node; on a
    multi-node job's other machines streaming's own check is all there is."""
    from filelock import FileLock

    lock = FileLock(REGISTRATION_LOCK) if holds_lock else None
    if lock is not None:
        lock.acquire()
    try:
        if barrier is not None:
            barrier()  # the leaders of this job hold their node's lock
        yield
        if barrier is not None:
            barrier()  # every rank of this job registered
    finally:
        if lock is not None:
            lock.release()
