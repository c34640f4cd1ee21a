"""DeepSpeed's checkpoint I/O, in memory and weights-only: a save is captured as host copies of
DeepSpeed's state dicts (written by our own writer), a load reads DeepSpeed's files with
torch.load(weights_only=True) and the few DeepSpeed classes they hold allow-listed."""
from __future__ import annotations

import collections
import copy
import io
import os
import re
from typing import Any

import torch

from trainer.checkpoint.pins import require
from trainer.checkpoint.store import step_name


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
    require("DeepSpeed checkpoint loading")
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
        """DeepSpeed's loader, reading every file with torch.load(weights_only=True): from the local
        path it is given, or, with `files`, from those in-memory files (path -> buffer, dropped with the
        engine after the load)."""

        def __init__(self, files: dict[str, io.BytesIO] | None = None):
            super().__init__()
            self.name = "DipSafeLoadCheckpointEngine"
            self.files = files

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            raise RuntimeError("the safe-load engine only loads")

        def load(self, path: str, map_location=None):
            source = path
            if self.files is not None:
                if path not in self.files:
                    raise FileNotFoundError(f"{os.path.basename(path)}: DeepSpeed asked for a file this rank did not "
                                            f"read (it has {sorted(os.path.basename(p) for p in self.files)})")
                source = self.files[path]  # DeepSpeed reads the model states twice (a version check first)
                source.seek(0)
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(source, map_location=map_location, weights_only=True)

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


_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")
STAGING_NAMES_PREFIX = "dip-ckpt-names-"  # a directory of empty placeholders DeepSpeed's loader lists


def engine_files_for_rank(names: list[str], rank: int) -> list[str]:
    """The DeepSpeed files of a step that `rank` loads on the world size that wrote it: its own
    zero_pp_rank_<rank>_* files and the shared ones (mp_rank_00_model_states.pt under ZeRO-0/1/2)."""
    mine = []
    for name in names:
        if not name.endswith(".pt"):
            continue
        match = _RANK_FILE.search(name)
        if match is None or int(match.group(1)) == rank:
            mine.append(name)
    return mine


def load_engine(engine, local_step_dir: str) -> None:
    """Restore module, optimizer and LR scheduler from a local step-N directory written by the same
    world size (DeepSpeed's own loader, reading with weights_only)."""
    _, safe_cls = _engine_classes()
    _load_with(engine, safe_cls(), os.path.dirname(local_step_dir), os.path.basename(local_step_dir), local_step_dir)


def load_engine_from_files(engine, tag: str, files: dict[str, io.BytesIO]) -> None:
    """The same, from in-memory files of step `tag` (relative path -> buffer, as engine_files_for_rank
    chose them). DeepSpeed lists and asserts its files on disk before it asks its checkpoint engine for
    them, so each one has an empty placeholder in a temporary directory (names only, no bytes); the
    engine hands DeepSpeed the buffer instead."""
    import tempfile

    _, safe_cls = _engine_classes()
    with tempfile.TemporaryDirectory(prefix=STAGING_NAMES_PREFIX) as root:
        by_path = {}
        for rel, buffer in files.items():
            path = os.path.join(root, tag, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
            by_path[path] = buffer
        _load_with(engine, safe_cls(by_path), root, tag, f"{tag} (in memory)")


def _load_with(engine, loader, load_dir: str, tag: str, where: str) -> None:
    original = engine.checkpoint_engine
    engine.checkpoint_engine = loader
    try:
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        engine.checkpoint_engine = original
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {where}")
