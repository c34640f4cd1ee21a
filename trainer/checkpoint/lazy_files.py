"""The files of one checkpoint step opened lazily: a torch.save file's zip directory and pickle are read
with torch.load(map_location="meta"), small tensors at once, and the large flat partitions later by byte
range (from a local directory, or straight from the store, chunk-checked: trainer.checkpoint.reader).
What trainer.checkpoint.repartition reads a re-partitioned resume through."""
from __future__ import annotations

import os

import pyarrow.fs as pafs
import torch

from trainer.checkpoint.reader import RangedReader

SMALL_TENSOR_BYTES = 64 << 10  # tensors up to this size are read when a file is opened (steps, scalers)


class LocalStepFiles:
    """A step directory on local disk, read by range without checksums (tests, tools)."""

    def __init__(self, step_dir: str):
        self.where = step_dir
        self.fs = pafs.LocalFileSystem()

    def names(self) -> list[str]:
        return sorted(os.listdir(self.where))

    def open(self, rel: str) -> RangedReader:
        return RangedReader(self.fs.open_input_file(os.path.join(self.where, rel)), rel)


class StoreStepFiles:
    """A committed step of a CheckpointStore, read by range, chunk-checked against its marker."""

    def __init__(self, store, step: int, marker: dict):
        self.store, self.step, self.marker, self.where = store, step, marker, store.display(step)
        self.readers: list[RangedReader] = []

    def names(self) -> list[str]:
        return sorted(self.marker.get("files") or {})

    def open(self, rel: str) -> RangedReader:
        reader = self.store.open_ranged(self.step, rel, self.marker)
        self.readers.append(reader)
        return reader

    @property
    def fetched(self) -> int:
        return sum(reader.fetched for reader in self.readers)


class RangedTensor:
    """A tensor of a lazily opened file: its shape and place in the file, read by range on demand."""

    def __init__(self, meta: torch.Tensor, reader: RangedReader):
        if not meta.is_contiguous():
            raise ValueError(f"{reader.rel}: a non-contiguous flat partition cannot be read by range")
        self.meta, self.reader = meta, reader

    def numel(self) -> int:
        return self.meta.numel()

    def slice(self, start: int, end: int) -> torch.Tensor:
        size = self.meta.element_size()
        first = self.meta.untyped_storage()._checkpoint_offset + (self.meta.storage_offset() + start) * size
        data = bytearray(self.reader.pread(first, (end - start) * size))
        if len(data) != (end - start) * size:
            raise ValueError(f"{self.reader.rel}: {len(data)} bytes where {(end - start) * size} were expected")
        return torch.frombuffer(data, dtype=self.meta.dtype) if data else torch.empty(0, dtype=self.meta.dtype)


def read_whole(meta: torch.Tensor, reader: RangedReader) -> torch.Tensor:
    """A small tensor of a lazily opened file, read whole (its storage's bytes)."""
    storage = meta.untyped_storage()
    data = bytearray(reader.pread(storage._checkpoint_offset, storage.nbytes()))
    flat = torch.frombuffer(data, dtype=meta.dtype) if data else torch.empty(0, dtype=meta.dtype)
    return flat.as_strided(meta.size(), meta.stride(), meta.storage_offset()).clone()


def _small_read(obj, reader: RangedReader):
    """obj with every small meta tensor read; large ones stay meta (their place kept by RangedTensor)."""
    if isinstance(obj, torch.Tensor):
        return read_whole(obj, reader) if obj.numel() * obj.element_size() <= SMALL_TENSOR_BYTES else obj
    if isinstance(obj, dict):
        items = {k: _small_read(v, reader) for k, v in obj.items()}
        obj.clear()
        obj.update(items)
        return obj
    if isinstance(obj, list):
        return [_small_read(v, reader) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields") and not isinstance(obj, torch.Size):
        return tuple(_small_read(v, reader) for v in obj)
    return obj


def open_lazily(reader: RangedReader, lazy_keys: tuple[str, ...] = ()):
    """A torch.save file's object with small tensors read and large ones as meta tensors: only the
    zip's directory, its pickle and those small tensors are read now. The top-level `lazy_keys` stay
    meta whatever their tensors' sizes (a model's many small weights, spread over the whole file, would
    otherwise pull in most of its chunks when a loader may need none of them)."""
    from trainer.checkpoint.deepspeed_io import deepspeed_safe_globals

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        obj = torch.load(reader, map_location="meta", weights_only=True)
    if isinstance(obj, dict) and lazy_keys:
        kept = {key: obj.pop(key) for key in lazy_keys if key in obj}
        return {**_small_read(obj, reader), **kept}
    return _small_read(obj, reader)


class LoadedTensor:
    """A flat partition small enough to have been read when its file was opened."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def numel(self) -> int:
        return self.tensor.numel()

    def slice(self, start: int, end: int) -> torch.Tensor:
        return self.tensor[start:end]
