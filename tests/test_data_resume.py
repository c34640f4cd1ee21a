"""Exact mid-epoch resume with two ranks as two real processes, both formats; elastic resume 2 -> 1 rank."""
from __future__ import annotations

import os

import pytest
import torch

from cluster.cli.main import main as dip
from tests.data_helpers import run_ranks

pytestmark = pytest.mark.slow
RES, BATCH, WORKERS, IMAGES = 32, 4, 2, 96  # 96 images / 2 ranks / batch 4 = 12 batches per rank-epoch


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume") / "shards")
    assert dip(["data", "shard", "--src", "synthetic", "--num-images", str(IMAGES), "--resolution", str(RES),
                "--out", out, "--format", "both", "--shard-size", "12KB", "--no-progress"]) == 0
    return out


def take_keys(rank, world_size, path, fmt, steps, load_from="", save_to="", save_after=-1):
    """One rank: optionally resume from a saved state, take `steps` batches, optionally save the state."""
    from data import DataConfig, build_dataloader

    loader = build_dataloader(DataConfig(path=path, format=fmt, resolution=RES, batch_size=BATCH,
                                         num_workers=WORKERS, seed=7), rank, world_size)
    try:
        if load_from:
            loader.load_state_dict(torch.load(load_from, weights_only=True))
        keys, epochs = [], []
        for step in range(steps):
            pixels, labels, batch_keys = next(loader)
            assert pixels.shape == (BATCH, 3, RES, RES) and labels.shape == (BATCH,)
            keys.append(batch_keys)
            epochs.append(loader.epoch)
            if step + 1 == save_after and rank == 0:
                torch.save(loader.state_dict(), save_to)  # rank 0's copy resumes every rank
        return keys, epochs
    finally:
        loader.close()


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_two_rank_resume_replays_the_same_keys(shard_dir, tmp_path, fmt):
    total, cut = 20, 7  # crosses the epoch boundary after the restart (12 batches per epoch)
    state = str(tmp_path / "loader_state.pt")
    straight = run_ranks(take_keys, 2, shard_dir, fmt, total)
    before = run_ranks(take_keys, 2, shard_dir, fmt, cut, "", state, cut)
    assert os.path.exists(state)
    after = run_ranks(take_keys, 2, shard_dir, fmt, total - cut, state)  # fresh processes
    for rank in range(2):
        keys, epochs = straight[rank]
        assert before[rank][0] + after[rank][0] == keys, f"rank {rank} diverged after resume"
        assert before[rank][1] + after[rank][1] == epochs
        assert epochs[11] == 0 and epochs[12] == 1
    epoch0 = [k for rank in range(2) for batch in straight[rank][0][:12] for k in batch]
    assert len(set(epoch0)) == IMAGES  # the two ranks share out the epoch: distinct samples


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_resume_with_fewer_ranks_finishes_the_epoch(shard_dir, tmp_path, fmt):
    """Saved by 2 ranks after 5 batches each, resumed by 1 rank: the epoch's other samples, each once."""
    state = str(tmp_path / "loader_state.pt")
    before = run_ranks(take_keys, 2, shard_dir, fmt, 5, "", state, 5)
    seen = [k for rank in range(2) for batch in before[rank][0] for k in batch]
    (keys, epochs), = run_ranks(take_keys, 1, shard_dir, fmt, (IMAGES - len(seen)) // BATCH + 1, state)
    rest = [k for batch, epoch in zip(keys, epochs) if epoch == 0 for k in batch]
    assert epochs[-1] == 1  # the epoch ended where the arithmetic says
    assert len(rest) == IMAGES - len(seen)
    assert sorted(seen + rest) == sorted(set(seen + rest)) and len(set(seen + rest)) == IMAGES
