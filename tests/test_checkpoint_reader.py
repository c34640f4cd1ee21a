"""Reading checkpoint files for loading (trainer/checkpoint/reader.py): checksummed as read, by range."""
from __future__ import annotations

import os

import pytest
import torch

from trainer.checkpoint.reader import CHUNK_BYTES, ChecksumMismatch
from trainer.checkpoint.lazy_files import LocalStepFiles, RangedTensor, open_lazily
from trainer.checkpoint.store import CheckpointStore


def _committed(tmp_path, payload) -> CheckpointStore:
    store = CheckpointStore(str(tmp_path / "store"))
    record = store.write_stream("step-1/x.pt", lambda f: torch.save(payload, f))
    store.commit(1, {"x.pt": record}, {})
    return store


def test_a_lazily_opened_file_reads_its_directory_and_small_tensors_then_slices_by_range(tmp_path):
    big, flat = torch.randn(300, 300), torch.arange(100_000.0)
    path = tmp_path / "f.pt"
    torch.save({"module": {"w": big, "b": torch.ones(5)}, "step": torch.tensor(3.0), "flat": [flat[7:]]}, path)
    reader = LocalStepFiles(str(tmp_path)).open("f.pt")
    obj = open_lazily(reader)
    assert reader.fetched < 20_000 < os.path.getsize(path)  # the zip directory, the pickle, the small tensors
    assert obj["module"]["w"].is_meta and obj["step"].item() == 3.0 and torch.equal(obj["module"]["b"], torch.ones(5))
    assert torch.equal(RangedTensor(obj["flat"][0], reader).slice(10, 20), flat[17:27])  # a view's offset is kept
    before = reader.fetched
    assert torch.equal(RangedTensor(obj["module"]["w"].view(-1), reader).slice(0, big.numel()).view(300, 300), big)
    assert reader.fetched - before == big.numel() * 4


def test_ranged_reads_check_each_chunk_and_name_the_file(tmp_path):
    values = torch.arange(600_000.0)  # 2.4 MB: three 1 MiB chunks
    store = _committed(tmp_path, {"a": values})
    marker = store.read_marker(1)
    assert len(marker["files"]["x.pt"]["chunks"]) == 3 and marker["files"]["x.pt"]["chunk_bytes"] == CHUNK_BYTES
    path = store.step_path(1, "x.pt")
    data = bytearray(open(path, "rb").read())
    data[CHUNK_BYTES + 500_000] ^= 1  # one bit in the middle chunk, the size unchanged
    open(path, "wb").write(data)
    reader = store.open_ranged(1, "x.pt", marker)
    lazy = open_lazily(reader)
    assert torch.equal(RangedTensor(lazy["a"], reader).slice(0, 10), values[:10])  # the first chunk is intact
    with pytest.raises(ChecksumMismatch, match=r"^x.pt was altered in place: its bytes \[1048576, 2097152\) have"):
        RangedTensor(lazy["a"], reader).slice(300_000, 300_010)
    with pytest.raises(ChecksumMismatch, match="^x.pt was altered in place: its xxh3_64 checksum is "):
        store.read_checked(1, "x.pt", marker)


def test_a_whole_file_read_is_checked_against_its_size_and_checksum(tmp_path):
    store = _committed(tmp_path, {"a": torch.arange(10.0)})
    marker = store.read_marker(1)
    assert torch.equal(torch.load(store.read_checked(1, "x.pt", marker), weights_only=True)["a"], torch.arange(10.0))
    with open(store.step_path(1, "x.pt"), "ab") as f:
        f.write(b"!")
    with pytest.raises(ChecksumMismatch, match="^x.pt is truncated or altered"):
        store.read_checked(1, "x.pt", marker)
