"""Saving and restoring a whole training state: DeepSpeed shards, EMA, data position, RNG.

A save runs in two phases. The *snapshot* (blocking, every rank): DeepSpeed's save_checkpoint is
pointed at a capturing checkpoint engine that copies each state dict to host memory instead of
writing it; rank 0 adds the EMA (ema.pt) and the train state (train_state.pt) with every rank's
data-loader and RNG state. The *write* (inline, or in a background thread when async): each rank
writes its files and reports them; rank 0 waits for every rank's report, writes the COMMITTED
marker last, then prunes old checkpoints. A crash anywhere in the write leaves an uncommitted
directory that is never loaded, and the previous checkpoint intact.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from trainer import faults
from trainer.checkpoint_store import EMA_FILE, TRAIN_STATE, CheckpointStore, step_name

log = logging.getLogger("dip.checkpoint")

TRAIN_STATE_FORMAT = 1


def to_host(obj: Any) -> Any:
    """A deep copy with every tensor cloned to CPU memory: training may now mutate the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = {k: to_host(v) for k, v in obj.items()}
        return collections.OrderedDict(copied) if isinstance(obj, collections.OrderedDict) else copied
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if isinstance(obj, torch.Size):  # ZeRO-3's param shapes: zero_to_fp32 needs Size, not tuple
        return obj
    if isinstance(obj, tuple):
        items = [to_host(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)  # namedtuples keep their type
    return copy.deepcopy(obj)


def deepspeed_safe_globals() -> list:
    """Non-tensor classes inside DeepSpeed's optimizer files, allow-listed for weights_only loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    safe = [LossScaler, DynamicLossScaler]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        safe.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        safe.append(fragment_address)
    except ImportError:
        pass
    return safe


def _engine_classes():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class CapturingCheckpointEngine(CheckpointEngine):
        """Takes DeepSpeed's state dicts in memory (host copies) instead of writing files."""

        def __init__(self):
            super().__init__()
            self.name = "DipCapturingCheckpointEngine"
            self.saved: list[tuple[str, Any]] = []

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            self.saved.append((path, to_host(state_dict)))

        def makedirs(self, path, exist_ok=False):
            pass  # nothing is written through this engine

        def load(self, path: str, map_location=None):
            raise RuntimeError("the capturing engine only saves")

        def commit(self, info):
            return True

    class SafeLoadCheckpointEngine(CheckpointEngine):
        """DeepSpeed's loader, reading every file with torch.load(weights_only=True)."""

        def __init__(self):
            super().__init__()
            self.name = "DipSafeLoadCheckpointEngine"

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            raise RuntimeError("the safe-load engine only loads")

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

        def commit(self, info):
            return True

    return CapturingCheckpointEngine, SafeLoadCheckpointEngine


def snapshot_engine(engine, step: int, staging_dir: str) -> list[tuple[str, Any]]:
    """Every file DeepSpeed would write for step-N on this rank, as (relative path, host object)."""
    capturing_cls, _ = _engine_classes()
    capture = capturing_cls()
    original = engine.checkpoint_engine
    engine.checkpoint_engine = capture
    try:
        # save_latest=False: DeepSpeed's `latest` file is no commit marker (it precedes the barrier)
        engine.save_checkpoint(staging_dir, tag=step_name(step), save_latest=False)
    finally:
        engine.checkpoint_engine = original
    tag_dir = os.path.join(staging_dir, step_name(step))
    return [(os.path.relpath(path, tag_dir), state) for path, state in capture.saved]


def load_engine(engine, local_step_dir: str) -> None:
    """Restore module, optimizer and LR scheduler from a local step-N directory (weights_only)."""
    _, safe_cls = _engine_classes()
    original = engine.checkpoint_engine
    engine.checkpoint_engine = safe_cls()
    try:
        load_path, _ = engine.load_checkpoint(os.path.dirname(local_step_dir), tag=os.path.basename(local_step_dir),
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        engine.checkpoint_engine = original
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {local_step_dir}")


def load_train_state(store: CheckpointStore, step: int) -> dict:
    state = torch.load(store.open_file(step, TRAIN_STATE), map_location="cpu", weights_only=True)
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{store.display(step)}/{TRAIN_STATE}: unknown format {state.get('format')!r}")
    return state


def load_ema_file(store: CheckpointStore, step: int) -> dict:
    return torch.load(store.open_file(step, EMA_FILE), map_location="cpu", weights_only=True)


def ema_file_payload(model_config, ema_state_dict: dict) -> dict:
    """ema.pt: what `dip sample` / trainer.model_io loads (the same layout as `dip export`)."""
    return {"model_config": dataclasses.asdict(model_config), "state_dict": ema_state_dict}


@dataclass
class RankState:
    """What one rank contributes to train_state.pt."""
    data: dict
    rng: dict


@dataclass
class SaveRequest:
    step: int
    files: list[tuple[str, Any]]
    marker_info: dict = field(default_factory=dict)


class Checkpointer:
    """Owns one rank's side of saving: snapshot, write (sync or async), commit (rank 0), prune."""

    def __init__(self, store: CheckpointStore, rank: int, world_size: int, attempt: str, keep: int,
                 async_save: bool, commit_timeout_s: float):
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt
        self.keep = keep
        self.async_save = async_save
        self.commit_timeout_s = commit_timeout_s
        self.staging_dir = tempfile.mkdtemp(prefix=f"dip-ckpt-staging-r{rank}-")
        self.last_committed: int | None = None
        self.blocking_seconds: list[float] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, engine, step: int, rank_state: RankState, train_state: dict | None = None,
             ema_payload: dict | None = None) -> float:
        """Checkpoint step-N. Collective: every rank calls it. Returns the seconds the caller was blocked."""
        start = time.perf_counter()
        self.wait()  # at most one write in flight
        gathered: list | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(dataclasses.asdict(rank_state), gathered, dst=0)
        files = snapshot_engine(engine, step, self.staging_dir)
        marker_info = {}
        if self.rank == 0:
            if train_state is None or ema_payload is None:
                raise ValueError("rank 0 must pass train_state and ema_payload")
            state = {**train_state, "format": TRAIN_STATE_FORMAT, "step": step, "world_size": self.world_size,
                     "ranks": to_host(gathered)}
            files += [(TRAIN_STATE, state), (EMA_FILE, to_host(ema_payload))]
            marker_info = {"world_size": self.world_size, "attempt": self.attempt,
                           "config_hash": train_state.get("config_hash")}
        request = SaveRequest(step, files, marker_info)
        if self.async_save:
            self._thread = threading.Thread(target=self._write_guarded, args=(request,), name=f"dip-ckpt-{step}",
                                            daemon=True)
            self._thread.start()
        else:
            self._write(request)
        blocked = time.perf_counter() - start
        self.blocking_seconds.append(blocked)
        return blocked

    def _write_guarded(self, request: SaveRequest) -> None:
        try:
            self._write(request)
        except BaseException as err:  # handed to the training thread at the next wait()
            self._error = err

    def _write(self, request: SaveRequest) -> None:
        written: dict[str, int] = {}
        prefix = step_name(request.step)
        for index, (rel, obj) in enumerate(request.files):
            written[rel] = self.store.write_stream(f"{prefix}/{rel}", lambda f, o=obj: torch.save(o, f))
            if index == 0:
                faults.in_checkpoint_write(request.step, self.rank)
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
