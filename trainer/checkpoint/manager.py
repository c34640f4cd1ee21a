"""Saving and restoring a whole training state: `CheckpointManager` owns both, over components.

What a checkpoint holds, per step-N/ directory:
* the DeepSpeed engine's files (module, ZeRO optimizer shards, LR schedule): every rank;
* ema.pt (the sampling model, `dip sample`'s format) and train_state.pt (progress counters, the
  config, the batch split, and every rank's data-loader and RNG state): rank 0.

A save runs in two phases. The *snapshot* (blocking, every rank): DeepSpeed's save_checkpoint is
pointed at a capturing checkpoint engine that copies each state dict to host memory instead of
writing it. The *write* (inline, or in a background thread when async): each rank writes its files
and reports them; rank 0 waits for every rank's report, writes the COMMITTED marker last, then
prunes old checkpoints. A crash anywhere in the write leaves an uncommitted directory that is never
loaded, and the previous checkpoint intact.

A restore reads the newest committed step, each file by the ranks that need it and checksummed as it
is read for loading (trainer.checkpoint.reader); a file that fails makes every rank fall back to the
previous committed step together. Nothing is staged on local disk. On the world size that wrote it,
DeepSpeed loads its own shards; on another (an elastic resize, or a run restarted by hand with another
cluster.num_workers), ZeRO-1/2/3 state is re-partitioned exactly by trainer.checkpoint.repartition, the data
loader deals the rest of the epoch out over the new ranks, and the progress counters, EMA and LR
schedule continue.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from data.remote import process_token, token_alive
from trainer import faults
from trainer.checkpoint.deepspeed_io import engine_files_for_rank, load_engine_from_files, snapshot_engine, to_host
from trainer.checkpoint.reader import ChecksumMismatch
from trainer.checkpoint.store import EMA_FILE, TRAIN_STATE, CheckpointStore, step_name
from trainer.checkpoint.rng_state import capture_rng, restore_rng

log = logging.getLogger("dip.checkpoint")

TRAIN_STATE_FORMAT = 1
STAGING_PREFIX = "dip-ckpt-staging-"
WRITE_THREADS = 4  # files of one rank written at once (see CheckpointManager._write)
# dip-ckpt-staging-r<rank>-<pid>-<process start time>-<mkdtemp suffix>: the owner is named, so a
# later writer can tell a SIGKILLed writer's leftover from a live writer's directory
_STAGING_DIR = re.compile(rf"^{STAGING_PREFIX}r\d+-(\d+-\d+)-[^-]+$")


def sweep_stale_staging_dirs(temp_dir: str | None = None) -> list[str]:
    """Remove the staging directories of writers whose process is gone (SIGKILLed or OOM-killed
    ranks never reach CheckpointManager.close). Returns what was removed."""
    temp_dir = temp_dir or tempfile.gettempdir()
    removed = []
    for name in os.listdir(temp_dir):
        match = _STAGING_DIR.match(name)
        if match and not token_alive(match.group(1)):
            shutil.rmtree(os.path.join(temp_dir, name), ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed %d staging dir(s) of dead checkpoint writers in %s", len(removed), temp_dir)
    return removed


def load_train_state(store: CheckpointStore, step: int, marker: dict | None = None) -> dict:
    """step-N's train_state.pt; checksummed as it is read when the step's marker is given."""
    source = store.open_file(step, TRAIN_STATE) if marker is None else store.read_checked(step, TRAIN_STATE, marker)
    state = torch.load(source, map_location="cpu", weights_only=True)
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{store.display(step)}/{TRAIN_STATE}: unknown format {state.get('format')!r}")
    return state


def load_ema_file(store: CheckpointStore, step: int) -> dict:
    return torch.load(store.open_file(step, EMA_FILE), map_location="cpu", weights_only=True)


def ema_file_payload(model_config, ema_state_dict: dict) -> dict:
    """ema.pt: what `dip sample` / trainer.model_io loads (the same layout as `dip export`)."""
    return {"model_config": dataclasses.asdict(model_config), "state_dict": ema_state_dict}


@dataclass
class TrainProgress:
    """The loop's own counters: a component with its state like the others. Run totals, exact across
    restarts because every one is restored from the checkpoint a (re)start resumes from and changed only
    by what happens after it: a restart that repeats a restore repeats the same count, never adds to it."""
    step: int = 0             # optimizer steps kept: a rollback rewinds it with the LR schedule (warmup,
                              # train.max_steps and checkpoint numbering count kept steps only)
    samples_seen: int = 0     # samples of the kept steps (step x global batch); rewound with the step
    last_loss: float | None = None
    resizes: int = 0          # world-size changes so far (each one is logged, numbered, in MLflow): the
                              # checkpoint's count + 1 when it was written at another world size
    nonfinite_steps: int = 0  # optimizer steps skipped for a NaN/Inf loss or gradient norm (trainer.loop.nonfinite)
    rollbacks: int = 0        # returns to the last committed checkpoint after too many of them in a row
    goodput: dict | None = None  # trainer.tracking.goodput's ledger state as of the save (rank 0's counts)
    discarded_steps: int = 0  # steps a rollback discarded: their data is not trained again, so the data
                              # stream is at step + discarded_steps global batches (faults key poison to it)
    launch: str = ""          # the `dip train` invocation (WorkerContext.launch_id) whose rollback budget runs
    launch_rollbacks: int = 0  # rollbacks since that invocation began: train.max_rollbacks bounds these

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.last_loss = state.get("last_loss")
        for name in ("resizes", "nonfinite_steps", "rollbacks", "discarded_steps", "launch_rollbacks"):
            setattr(self, name, int(state.get(name, 0)))
        self.launch = str(state.get("launch", ""))
        if "goodput" in state:  # a rollback's counters (no ledger) keep the restored checkpoint's
            self.goodput = state["goodput"]

    @property
    def data_step(self) -> int:
        """Global batches the data stream has dealt: the kept steps and those rollbacks discarded."""
        return self.step + self.discarded_steps

    def begin_launch(self, launch_id: str) -> None:
        """A (re)start of the worker group: the same `dip train` invocation (a Ray restart after a lost
        worker) keeps its rollback budget's use; a new invocation (a re-run after the run failed) starts
        a fresh budget. The run totals carry on either way."""
        if launch_id != self.launch:
            self.launch, self.launch_rollbacks = launch_id, 0


def dealt_corrupt_samples(saved_ranks: list[dict], rank: int) -> int:
    """Each saved rank's loader counted the corrupt samples it skipped; restored, rank 0 takes the sum and
    the others start at 0, so that the sum over ranks (reporting's corrupt_samples) stays the run's total
    on any world size (dealing rank 0's own count to every rank would multiply it by the world size)."""
    return sum(int(r["data"].get("corrupt_samples", 0)) for r in saved_ranks) if rank == 0 else 0


@dataclass
class RunIdentity:
    """What a checkpoint records about the run that wrote it (rank 0's train_state.pt)."""
    config: dict
    config_hash: str
    mlflow_run_id: str
    model_config: Any          # models.DiPConfig: written into ema.pt for `dip sample`


@dataclass
class Resumed:
    """What `CheckpointManager.resume` restored, for the caller to report."""
    step: int
    where: str
    saved_world_size: int
    saved_split: dict | None   # {"micro_batch", "world_size", "grad_accum"}; None before splits were recorded
    resharded: bool            # the ZeRO state was re-partitioned for another world size


@dataclass
class SaveRequest:
    step: int
    files: list[tuple[str, Any]]
    marker_info: dict = field(default_factory=dict)


class CheckpointManager:
    """Owns one rank's checkpoints: what a checkpoint holds (engine, EMA, data loader, RNG, progress),
    saving it (snapshot -> write, sync or async -> commit on rank 0 -> prune) and restoring it, on this
    world size or another. Every method that touches a checkpoint is collective: every rank calls it."""

    def __init__(self, store: CheckpointStore, rank: int, world_size: int, split, *, engine, loader,
                 progress: TrainProgress, ema, identity: RunIdentity, zero_stage: int, keep: int,
                 async_save: bool, commit_timeout_s: float):
        self.store, self.rank, self.world_size, self.split = store, rank, world_size, split
        self.engine, self.loader, self.progress, self.ema = engine, loader, progress, ema
        self.identity, self.zero_stage = identity, zero_stage
        self.keep, self.async_save, self.commit_timeout_s = keep, async_save, commit_timeout_s
        self.attempt = ""
        sweep_stale_staging_dirs()
        self.staging_dir = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}r{rank}-{process_token(os.getpid())}-")
        self.last_committed: int | None = None
        self.last_saved_step: int | None = None
        self.blocking_seconds: list[float] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------------------------------
    #                                         restore
    # ------------------------------------------------------------------------------------------
    def resume(self, enabled: bool = True) -> Resumed | None:
        """Agree on the newest checkpoint that loads, clear leftovers newer than it (rank 0), name this
        attempt, and restore every component from it. None: a fresh start."""
        candidates: list = [[]]
        if self.rank == 0 and enabled:
            candidates = [list(reversed(self.store.committed_steps(warn=True)))]
        dist.broadcast_object_list(candidates, src=0)
        resumed = None
        for step in candidates[0]:
            resumed = self._try_restore(step)
            if resumed is not None:
                break
        payload: list = [None]
        if self.rank == 0:
            self.store.discard_after(None if resumed is None else resumed.step)
            payload = [uuid.uuid4().hex]
        dist.broadcast_object_list(payload, src=0)
        self.attempt = payload[0]
        return resumed

    def newest_loadable(self) -> int | None:
        """The newest committed checkpoint whose every file matches the checksum its marker recorded
        (collective; a rollback's choice). Each rank reads a share of the files, so the checkpoint is
        read once in all; a failed file on any rank skips the step on every rank, with a warning naming it."""
        candidates: list = [None]
        if self.rank == 0:
            candidates = [list(reversed(self.store.committed_steps(warn=True)))]
        dist.broadcast_object_list(candidates, src=0)
        for step in candidates[0]:
            mine = self.store.marker_files(step)[self.rank::self.world_size]
            if self._agree(step, self.store.verify(step, deep=mine).reason):
                return step
        return None

    def _agree(self, step: int, reason: str) -> bool:
        """Collective: True when no rank found a problem with step-N; else rank 0 warns with every reason."""
        reasons: list = [None] * self.world_size
        dist.all_gather_object(reasons, reason)
        bad = [r for r in reasons if r]
        if bad and self.rank == 0:
            log.warning("skipping checkpoint %s: %s; using the previous committed one", self.store.display(step),
                        "; ".join(dict.fromkeys(bad)))
        return not bad

    def _try_restore(self, step: int, data_state: dict | None = None) -> Resumed | None:
        """Restore step-N, or None on every rank when any rank read a file that failed its checksum.
        Two agreements: after the whole-file reads (before DeepSpeed's loader, which may run collectives),
        and after the engine's load (ranged reads re-partitioning another world size's state)."""
        reason, staged = "", None
        try:
            staged = self._read_step(step)
        except ChecksumMismatch as err:
            reason = str(err)
        if not self._agree(step, reason):
            return None
        try:
            self._load_engine(step, staged)
        except ChecksumMismatch as err:
            reason = str(err)
        if not self._agree(step, reason):
            return None
        return self._restore_components(step, staged, data_state)

    def restore(self, step: int, data_state: dict | None = None) -> Resumed:
        """Every component from step-N (collective). data_state: the data loader's position to take
        instead of the checkpoint's (a rollback keeps the data where it is, skipping what caused it)."""
        staged = self._read_step(step)
        self._load_engine(step, staged)
        return self._restore_components(step, staged, data_state)

    def _read_step(self, step: int) -> dict:
        """What this rank loads whole, read and checksummed now (ChecksumMismatch names a bad file):
        train_state.pt (every rank), ema.pt (rank 0), and on the saving world size (or ZeRO-0) the rank's
        own DeepSpeed files and the shared ones. Held in memory until loaded (bounded by those files)."""
        marker = self.store.read_marker(step) or {}
        state = load_train_state(self.store, step, marker)
        saved_world = int(state["world_size"])
        resharded = saved_world != self.world_size and self.zero_stage != 0
        engine_files = {} if resharded else {
            rel: self.store.read_checked(step, rel, marker)
            for rel in engine_files_for_rank([r for r in marker.get("files", {}) if r not in (TRAIN_STATE, EMA_FILE)],
                                             self.rank)}
        ema = self.store.read_checked(step, EMA_FILE, marker) if self.rank == 0 else None
        return {"marker": marker, "state": state, "resharded": resharded, "engine_files": engine_files, "ema": ema}

    def _load_engine(self, step: int, staged: dict) -> None:
        if staged["resharded"]:
            from trainer.checkpoint.lazy_files import StoreStepFiles
            from trainer.checkpoint.repartition import load_resharded

            load_resharded(self.engine, StoreStepFiles(self.store, step, staged["marker"]))
        else:  # same world size, or ZeRO-0 (whole optimizer state in one file)
            load_engine_from_files(self.engine, step_name(step), staged.pop("engine_files"))

    def _restore_components(self, step: int, staged: dict, data_state: dict | None) -> Resumed:
        state = staged["state"]
        saved_world = int(state["world_size"])
        same_world = saved_world == self.world_size
        # every rank's data state describes the same global position; another world size re-deals the
        # epoch's rest from it. Process RNGs belong to ranks: carried over only when the ranks are the same.
        ranks = state["ranks"]
        mine = ranks[self.rank] if same_world else ranks[0]
        self.loader.load_state_dict(mine["data"] if data_state is None else data_state)
        if data_state is None:
            self.loader.corrupt_samples = dealt_corrupt_samples(ranks, self.rank)
        if same_world:
            restore_rng(mine["rng"])
        # rank 0 read ema.pt; under ZeRO-3 each rank keeps its partition at this world size (collective)
        ema_weights = torch.load(staged["ema"], map_location="cpu", weights_only=True)["state_dict"] \
            if self.rank == 0 else None
        self.ema.load_full_state_dict(ema_weights, state["ema_num_updates"])
        self.progress.load_state_dict(state)
        if not same_world:  # a function of (checkpoint, world size): a repeated restore counts the same resize
            self.progress.resizes += 1
        self.last_saved_step = self.progress.step
        return Resumed(step, self.store.display(step), saved_world, state.get("batch_split"), staged["resharded"])

    def discard_after(self, step: int) -> None:
        """After a rollback to step-N (the newest loadable): the step directories newer than it (committed
        ones that failed their checksums, leftovers) hold discarded work; rank 0 removes them, so that
        neither the re-numbered steps that follow nor a later resume ever meet them."""
        if self.rank == 0:
            self.store.discard_after(step)
        if self.last_committed is not None and self.last_committed > step:
            self.last_committed = step

    # ------------------------------------------------------------------------------------------
    #                                          save
    # ------------------------------------------------------------------------------------------
    def save(self) -> float:
        """Checkpoint the current step. Returns the seconds the caller was blocked."""
        start = time.perf_counter()
        step = self.progress.step
        self.wait()  # at most one write in flight
        rank_state = {"data": self.loader.state_dict(), "rng": capture_rng()}
        gathered: list | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(rank_state, gathered, dst=0)
        files = snapshot_engine(self.engine, step, self.staging_dir)
        ema_weights = self.ema.full_state_dict()  # collective under ZeRO-3; a host copy on rank 0
        marker_info = {}
        if self.rank == 0:
            files += [(TRAIN_STATE, self._train_state(step, gathered)),
                      (EMA_FILE, ema_file_payload(self.identity.model_config, ema_weights))]
            marker_info = {"world_size": self.world_size, "attempt": self.attempt,
                           "config_hash": self.identity.config_hash}
        request = SaveRequest(step, files, marker_info)
        if self.async_save:
            self._thread = threading.Thread(target=self._write_guarded, args=(request,), name=f"dip-ckpt-{step}",
                                            daemon=True)
            self._thread.start()
        else:
            self._write(request)
        self.last_saved_step = step
        blocked = time.perf_counter() - start
        self.blocking_seconds.append(blocked)
        return blocked

    def _train_state(self, step: int, ranks: list) -> dict:
        return {**self.progress.state_dict(), "format": TRAIN_STATE_FORMAT, "step": step,
                "world_size": self.world_size, "batch_split": dataclasses.asdict(self.split),
                "config": self.identity.config, "config_hash": self.identity.config_hash,
                "mlflow_run_id": self.identity.mlflow_run_id, "ema_num_updates": self.ema.num_updates,
                "ema_decay": self.ema.decay, "ranks": to_host(ranks)}

    def _write_guarded(self, request: SaveRequest) -> None:
        try:
            self._write(request)
        except BaseException as err:  # handed to the training thread at the next wait()
            self._error = err

    def _write(self, request: SaveRequest) -> None:
        prefix = step_name(request.step)

        def write_one(rel: str, obj) -> dict:
            return self.store.write_stream(f"{prefix}/{rel}", lambda f: torch.save(obj, f))

        # A rank's files go out side by side (rank 0 has up to four: its engine files, train_state.pt and
        # ema.pt): an object store's latency and a local fsync overlap, and pyarrow streams each large file
        # in multipart parts as torch.save writes it (nothing is staged or written twice).
        with ThreadPoolExecutor(max_workers=min(WRITE_THREADS, len(request.files)) or 1,
                                thread_name_prefix=f"dip-ckpt-{request.step}-w") as pool:
            futures = {rel: pool.submit(write_one, rel, obj) for rel, obj in request.files}
            first = next(iter(futures.values()), None)
            if first is not None:
                first.result()
                faults.in_checkpoint_write(request.step, self.rank)  # a fault test's kill: mid-write
            written = {rel: future.result() for rel, future in futures.items()}
        self.store.report_done(request.step, self.rank, self.attempt, written)
        if self.rank != 0:
            return
        files = self.store.wait_for_ranks(request.step, self.world_size, self.attempt, self.commit_timeout_s)
        self.store.commit(request.step, files, request.marker_info)
        self.last_committed = request.step
        pruned = self.store.prune(self.keep)
        log.info("checkpoint committed: %s%s", self.store.display(request.step),
                 f" (pruned {', '.join(step_name(s) for s in pruned)})" if pruned else "")

    def close(self) -> None:
        """Finish the write in flight and remove the staging directory."""
        self.wait()
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def wait(self) -> None:
        """Finish the write in flight; a failed background write is raised here, in the training thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"an asynchronous checkpoint write failed: {error!r}") from error
