"""A directory of `step-N/` checkpoints on any pyarrow filesystem: local, shared (NFS), or `s3://`.

A checkpoint counts only once its COMMITTED marker exists. The marker is written last, by rank 0,
after every rank has reported its files; it lists every file with its size and a checksum, so a
truncated file or a half-written directory is recognised by its size (a cheap listing), and a file
altered in place by its checksum (read before the checkpoint is loaded). DeepSpeed's own `latest`
file is not used: it is written before the ranks' barrier.

The checksum is XXH3-64 (xxhash), computed while the file is written, so saving reads nothing back:
under 0.1 s per GB of one core here (benchmarks/checksum.py, benchmarks/RESULTS.md). Markers written
before checksums existed list sizes only; they stay valid, checked by size.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs
import xxhash

from trainer.checkpoint.reader import (CHECKSUM, ChecksumMismatch, ChunkHasher, MemoryFile, RangedReader,
                                       read_verified)

log = logging.getLogger("dip.checkpoint")

MARKER = "COMMITTED"
TRAIN_STATE = "train_state.pt"
EMA_FILE = "ema.pt"
DONE_PREFIX = ".done-rank-"
STOP_REQUEST = "STOP_REQUESTED"
RESIZE_REQUEST = "RESIZE_REQUESTED"
RESIZE_ANSWER_PREFIX = "RESIZE_ANSWERED-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
READ_CHUNK = 8 << 20     # bytes per read when a file is checksummed


def _resize_answer(request_id: str) -> str:
    return f"{RESIZE_ANSWER_PREFIX}{request_id}"


def _resize_outcome(request_id: str) -> str:
    return f"{RESIZE_ANSWER_PREFIX}{request_id}.outcome"  # cleared with the answers at a run's start


def new_hasher():
    return xxhash.xxh3_64()


class _HashingWriter:
    """A write-only file object in front of the real one: hashes and counts every byte on its way to
    the file (a whole-file checksum and one per chunk, trainer.checkpoint.reader). Not seekable, so a
    writer cannot go back and change what was hashed (torch.save streams)."""

    def __init__(self, raw):
        self.raw, self.hasher = raw, ChunkHasher()

    @property
    def size(self) -> int:
        return self.hasher.size

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.raw.write(view)
        return len(view)

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def record(self) -> dict:
        return self.hasher.record()


def recorded_size(record) -> int:
    """A marker's entry for one file: {"size", "checksum", "algorithm"}, or a bare size (older markers)."""
    return int(record["size"]) if isinstance(record, dict) else int(record)


def step_name(step: int) -> str:
    return f"step-{step}"


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root path inside it, is_local) for a local path or a `scheme://` URI."""
    if "://" in uri and not uri.startswith("file://"):
        fs, root = pafs.FileSystem.from_uri(uri)
        return fs, root.rstrip("/"), False
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(path), True


@dataclass
class Verdict:
    step: int
    ok: bool
    reason: str = ""


class CheckpointStore:
    """Layout and commit protocol of <root>/step-N/; knows nothing of models or DeepSpeed."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        self.uri = uri
        if filesystem is not None:
            self.fs, self.root, self.is_local = filesystem, uri.rstrip("/"), isinstance(filesystem, pafs.LocalFileSystem)
        else:
            self.fs, self.root, self.is_local = resolve_filesystem(uri)
        self.fs.create_dir(self.root, recursive=True)

    # -- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def step_path(self, step: int, *parts: str) -> str:
        return self.path(step_name(step), *parts)

    def display(self, step: int | None = None) -> str:
        """A path a person can paste: the local path, or the URI for object storage."""
        base = self.root if self.is_local else self.uri.rstrip("/")
        return base if step is None else f"{base}/{step_name(step)}"

    # -- listing and verifying -----------------------------------------------------------------
    def steps(self) -> list[int]:
        """Every step-N directory, committed or not, ascending."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        found = []
        for info in infos:
            match = _STEP_DIR.match(info.base_name)
            if match and info.type == pafs.FileType.Directory:
                found.append(int(match.group(1)))
        return sorted(found)

    def read_marker(self, step: int) -> dict | None:
        try:
            with self.fs.open_input_stream(self.step_path(step, MARKER)) as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"corrupt": True}

    def verify(self, step: int, deep=False, only=None) -> Verdict:
        """Committed and complete: the marker exists and every file it lists has its recorded size.
        deep=True also reads every file and compares its checksum with the marker's; deep=[files] does
        that for those files only. only=[files] judges just those files (what a loader reads; each must
        be listed). A checksum costs a full read of the file: listings check sizes, loaders checksums."""
        marker = self.read_marker(step)
        if marker is None:
            return Verdict(step, False, "no COMMITTED marker (an interrupted or in-flight write)")
        if marker.get("corrupt") or not isinstance(marker.get("files"), dict):
            return Verdict(step, False, "the COMMITTED marker is unreadable")
        files = marker["files"]
        names = list(files) if only is None else list(only)
        unlisted = [rel for rel in names if rel not in files]
        if unlisted:
            return Verdict(step, False, f"{unlisted[0]} is not listed in the COMMITTED marker")
        infos = self.fs.get_file_info([self.step_path(step, rel) for rel in names]) if names else []
        for rel, info in zip(names, infos):
            if info.type != pafs.FileType.File:
                return Verdict(step, False, f"{rel} is missing")
            if info.size != recorded_size(files[rel]):
                return Verdict(step, False, f"{rel} is truncated or altered ({info.size} bytes, marker says "
                                            f"{recorded_size(files[rel])})")
        for rel in names if deep is True else [rel for rel in (deep or ()) if rel in names]:
            record = files[rel]
            if not isinstance(record, dict) or record.get("algorithm") != CHECKSUM:
                continue  # an older marker: sizes only
            actual = self.checksum(step, rel)
            if actual != record["checksum"]:
                return Verdict(step, False, f"{rel} was altered in place: its {CHECKSUM} checksum is {actual}, "
                                            f"the COMMITTED marker recorded {record['checksum']} (same size)")
        return Verdict(step, True)

    def marker_files(self, step: int) -> list[str]:
        """The files step-N's marker lists, sorted (empty when it has no readable marker)."""
        marker = self.read_marker(step) or {}
        return sorted(marker.get("files") or {})

    def checksum(self, step: int, rel_path: str) -> str:
        """The checksum of one file of step-N as stored now (a streaming read)."""
        hasher = new_hasher()
        with self.fs.open_input_stream(self.step_path(step, rel_path)) as f:
            while chunk := f.read(READ_CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()

    def committed_steps(self, warn: bool = True) -> list[int]:
        good = []
        for step in self.steps():
            verdict = self.verify(step)
            if verdict.ok:
                good.append(step)
            elif warn:
                log.warning("skipping checkpoint %s: %s", self.display(step), verdict.reason)
        return good

    def latest_committed(self, warn: bool = True, deep=False, only=None) -> int | None:
        """The newest checkpoint that verifies (`deep`, `only`: as in verify); newer broken ones are named
        in a warning and skipped."""
        for step in reversed(self.steps()):
            verdict = self.verify(step, deep=deep, only=only)
            if verdict.ok:
                return step
            if warn:
                log.warning("skipping checkpoint %s: %s", self.display(step), verdict.reason)
        return None

    # -- writing -------------------------------------------------------------------------------
    def write_stream(self, rel_path: str, write_fn) -> dict:
        """Write one file through write_fn(file object). Returns its marker entry: {"size", "checksum",
        "algorithm"}, hashed on the way out (nothing is read back). Local files are fsynced."""
        path = self.path(rel_path)
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            with open(path, "wb") as f:
                writer = _HashingWriter(f)
                write_fn(writer)
                f.flush()
                os.fsync(f.fileno())
            stored = os.path.getsize(path)
        else:
            with self.fs.open_output_stream(path) as f:
                writer = _HashingWriter(f)
                write_fn(writer)
            stored = self.fs.get_file_info(path).size
        if stored != writer.size:  # the file is not the byte stream that was hashed
            raise OSError(f"{path}: {stored} bytes stored but {writer.size} written")
        return writer.record()

    def write_json(self, rel_path: str, payload: dict, atomic: bool = True) -> None:
        data = json.dumps(payload, indent=1, sort_keys=True).encode()
        if self.is_local and atomic:  # write aside, then rename: a reader sees all of it or nothing
            tmp = rel_path + ".tmp"
            self.write_stream(tmp, lambda f: f.write(data))
            os.replace(self.path(tmp), self.path(rel_path))
        else:  # an object-store PUT is atomic by itself
            self.write_stream(rel_path, lambda f: f.write(data))

    def read_json(self, rel_path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path(rel_path)) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, ValueError):
            return None

    def report_done(self, step: int, rank: int, attempt: str, files: dict[str, dict]) -> None:
        """A rank's own 'my files are written' note; rank 0 commits once it has every rank's."""
        self.write_json(f"{step_name(step)}/{DONE_PREFIX}{rank}.json", {"attempt": attempt, "files": files})

    def wait_for_ranks(self, step: int, world_size: int, attempt: str, timeout_s: float,
                       poll_s: float = 0.05) -> dict[str, dict]:
        """Block until every rank of this attempt reported step's files; return the merged file list."""
        deadline = time.monotonic() + timeout_s
        merged: dict[int, dict[str, dict]] = {}
        while True:
            for rank in range(world_size):
                if rank in merged:
                    continue
                note = self.read_json(f"{step_name(step)}/{DONE_PREFIX}{rank}.json")
                if note is not None and note.get("attempt") == attempt:  # a dead attempt's note does not count
                    merged[rank] = note["files"]
            if len(merged) == world_size:
                return {rel: record for files in merged.values() for rel, record in files.items()}
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(merged))
                raise TimeoutError(f"checkpoint {self.display(step)}: ranks {missing} did not finish writing "
                                   f"within {timeout_s:.0f} s; it stays uncommitted")
            time.sleep(poll_s)

    def commit(self, step: int, files: dict[str, dict], info: dict) -> None:
        """Write the marker: the one act that makes step-N count."""
        self.write_json(f"{step_name(step)}/{MARKER}", {**info, "step": step, "files": files,
                                                         "committed_at": time.time()})

    # -- deleting ------------------------------------------------------------------------------
    def delete_step(self, step: int) -> None:
        try:
            self.fs.delete_dir(self.step_path(step))
        except FileNotFoundError:
            pass

    def prune(self, keep: int) -> list[int]:
        """Keep the newest `keep` committed checkpoints. Delete older committed ones and uncommitted
        leftovers older than the newest committed one. Never touches anything newer than the newest
        committed checkpoint (it may be in flight), so the last committed one always survives."""
        committed = self.committed_steps(warn=False)
        if not committed:
            return []
        newest = committed[-1]
        keep_set = set(committed[-keep:])
        doomed = [s for s in self.steps() if s < newest and s not in keep_set]
        for step in doomed:
            self.delete_step(step)
        return doomed

    def discard_after(self, step: int | None) -> list[int]:
        """At resume: remove step dirs newer than the resume point (uncommitted or broken leftovers
        of a dead attempt), so a re-written step-N never mixes files of two attempts."""
        doomed = [s for s in self.steps() if step is None or s > step]
        for s in doomed:
            log.warning("removing leftover checkpoint %s (not committed or not loadable)", self.display(s))
            self.delete_step(s)
        return doomed

    # -- reading for resume --------------------------------------------------------------------
    def open_file(self, step: int, rel_path: str) -> io.BytesIO:
        with self.fs.open_input_stream(self.step_path(step, rel_path)) as f:
            return io.BytesIO(f.read())

    def read_checked(self, step: int, rel_path: str, marker: dict) -> MemoryFile:
        """One file of step-N in memory, checksummed while it is read (ChecksumMismatch names it)."""
        files = marker.get("files") or {}
        if rel_path not in files:
            raise ChecksumMismatch(f"{rel_path} is not listed in the COMMITTED marker")
        return MemoryFile(read_verified(self.fs, self.step_path(step, rel_path), rel_path, files[rel_path]))

    def open_ranged(self, step: int, rel_path: str, marker: dict | None) -> RangedReader:
        """A seekable file object reading one file of step-N by range (chunk-checked when the marker
        records chunk checksums; marker None: unchecked, for a directory read outside a resume)."""
        record = None
        if marker is not None:
            files = marker.get("files") or {}
            if rel_path not in files:
                raise ChecksumMismatch(f"{rel_path} is not listed in the COMMITTED marker")
            record = files[rel_path]
        return RangedReader(self.fs.open_input_file(self.step_path(step, rel_path)), rel_path, record)

    def local_dir(self, step: int, cache_dir: str) -> str:
        """A local directory holding step-N: the directory itself when local, else a downloaded copy."""
        if self.is_local:
            return self.step_path(step)
        target = os.path.join(cache_dir, step_name(step))
        marker = self.read_marker(step) or {}
        os.makedirs(target, exist_ok=True)
        for rel in marker.get("files", {}):
            dest = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            pafs.copy_files(self.step_path(step, rel), dest, source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        return target

    # -- stop requests (the driver asks the workers to checkpoint and stop) --------------------
    def request_stop(self) -> None:
        self.write_json(STOP_REQUEST, {"requested_at": time.time()})

    def stop_requested(self) -> bool:
        return self.fs.get_file_info(self.path(STOP_REQUEST)).type == pafs.FileType.File

    def clear_stop_request(self) -> None:
        self._delete_note(STOP_REQUEST)

    # -- resize requests (an elastic run about to grow asks the workers for a checkpoint first) -
    # A request is one note written by the driver side only; it carries its own id and expiry. The
    # workers answer in a separate note named by that id, so an answer can never bring back a request
    # the driver already withdrew, and an answer to an old request is never read as one to a new one.
    def request_resize(self, to_workers: int, expires_in_s: float) -> str:
        """Ask the workers for a checkpoint before a grow; returns the request's id."""
        request_id = uuid.uuid4().hex
        now = time.time()
        self.write_json(RESIZE_REQUEST, {"id": request_id, "to_workers": to_workers, "requested_at": now,
                                         "expires_at": now + expires_in_s})
        return request_id

    def resize_request(self) -> dict | None:
        """The pending resize request ({"id", "to_workers", "requested_at", "expires_at"}), or None when
        there is none, or it is past its expiry (its driver gave up or died), or it is from before
        requests had ids."""
        note = self.read_json(RESIZE_REQUEST)
        if not note or "id" not in note or time.time() >= float(note.get("expires_at", 0)):
            return None
        return note

    def resize_requested(self) -> bool:
        return self.resize_request() is not None

    def answer_resize(self, request_id: str, step: int) -> bool:
        """The workers' answer to request `request_id`: the step they committed for it. Written only while
        that very request is pending (False, nothing written, when it was withdrawn or expired); it
        never creates or rewrites the request note."""
        pending = self.resize_request()
        if pending is None or pending["id"] != request_id:
            log.warning("resize request %s was withdrawn before the workers answered it (step %d): no answer "
                        "written", request_id, step)
            return False
        self.write_json(_resize_answer(request_id), {"id": request_id, "checkpoint_step": step})
        return True

    def resize_checkpoint(self, request_id: str) -> int | None:
        """The step the workers committed for request `request_id`, once they answered."""
        note = self.read_json(_resize_answer(request_id)) or {}
        return note.get("checkpoint_step") if note.get("id") == request_id else None

    def withdraw_resize_request(self, request_id: str, outcome: str | None = None) -> None:
        """The driver side is done with its request (answered, timed out, or the group failed): delete it
        (only if it is still this one) and its answer. `outcome` ("grow": Ray restarts the group bigger;
        "no-grow": the capacity went away meanwhile) is written first, for the workers that wait on it."""
        if outcome is not None:
            self.write_json(_resize_outcome(request_id), {"id": request_id, "outcome": outcome})
        pending = self.read_json(RESIZE_REQUEST) or {}
        if pending.get("id") == request_id:
            self._delete_note(RESIZE_REQUEST)
        self._delete_note(_resize_answer(request_id))

    def resize_outcome(self, request_id: str) -> str | None:
        """What the driver side decided on request `request_id` once it withdrew it ("grow", "no-grow"), or
        None (not decided, or it gave up without deciding)."""
        note = self.read_json(_resize_outcome(request_id)) or {}
        return note.get("outcome") if note.get("id") == request_id else None

    def clear_resize_request(self) -> None:
        """At a run's start: any request or answer left by an earlier attempt."""
        self._delete_note(RESIZE_REQUEST)
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        for info in infos:
            if info.base_name.startswith(RESIZE_ANSWER_PREFIX) and info.type == pafs.FileType.File:
                self._delete_note(info.base_name)

    def _delete_note(self, name: str) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass
