"""The ZeRO-3 EMA kept sharded (trainer.loop.training_ema.ShardedEMA) against the gathered EMA it replaced.

The trainer's own loop (trainer.loop.run.TrainingRun, DeepSpeed ZeRO-3 on CPU, gloo) runs in real
processes (no Ray). Next to it, each step, the test runs the old path (trainer.loop.training_ema.
gathered_update: gather the whole denoiser, update a whole fp32 models.ema.EMA on rank 0, built
from the same initial weights):
* 2 ranks, 3 steps: the ema.pt the sharded EMA writes, and the network it hands the sample grid, are
  bit-identical (torch.equal) to the gathered EMA;
* 2 -> 1 and 1 -> 2: a run resumed on another world size re-partitions the checkpoint's ema.pt, and
  the EMA it holds (gathered back) is that ema.pt, bit for bit; it then steps on in lockstep with a
  gathered EMA seeded from the same file.
"""
from __future__ import annotations

import os

import pytest

from tests.data_helpers import run_ranks
from tests.test_trainer_support import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data import prepare_dataset
    from trainer.config import config_from_dict

    cfg = config_from_dict(TINY)
    return prepare_dataset(cfg.data, str(tmp_path_factory.mktemp("sharded-ema-data"))).path


def _ema_file(store_dir: str, step: int) -> dict:
    import torch

    return torch.load(os.path.join(store_dir, f"step-{step}", "ema.pt"), map_location="cpu",
                      weights_only=True)["state_dict"]


def _differences(got: dict, want: dict) -> list[str]:
    import torch

    if list(got) != list(want):
        return [f"keys differ: {sorted(set(got) ^ set(want))[:5]}"]
    return [key for key in want if not torch.equal(got[key], want[key])]


def train(rank: int, world: int, cfg_dict: dict, store_dir: str, until: int, save_at: tuple[int, ...]) -> dict:
    """One rank: resume from store_dir if it holds a checkpoint, step to `until` beside the gathered
    reference, save at `save_at`."""
    from models.ema import EMA
    from trainer.config import config_from_dict
    from trainer.loop.engine import build_objective_module
    from trainer.loop.training_ema import ShardedEMA, gathered_update
    from trainer.loop.run import TrainingRun, WorkerContext

    cfg = config_from_dict(cfg_dict)
    # the old path's rank-0 EMA: the same initial weights (the same seed), before DeepSpeed casts them
    reference = EMA(build_objective_module(cfg).denoiser, cfg.optim.ema_decay) if rank == 0 else None
    run = TrainingRun(cfg, WorkerContext(store_dir, os.path.dirname(store_dir), "", ""), rank, world)
    run.setup()
    assert isinstance(run.ema, ShardedEMA)
    found: dict = {"resumed_from": run.progress.step, "restored": [], "saved": {}, "grid": []}
    if run.progress.step:
        restored = run.ema.full_state_dict()  # collective
        if rank == 0:
            saved = _ema_file(store_dir, run.progress.step)
            found["restored"] = _differences(restored, saved)
            reference.module.load_state_dict(saved)
    while run.progress.step < until:
        run.train_step()
        gathered_update(reference, run.engine.module.denoiser)  # collective
        run.progress.step += 1
        run.progress.samples_seen += cfg.global_batch
        if run.progress.step in save_at:
            run.save_checkpoint()
    run.checkpoints.close()
    grid = run.make_grid("grid.png")  # collective: the grid samples from the gathered EMA
    sampled = run.ema.sampling_module()
    run.loader.close()
    if rank == 0:
        want = reference.module.state_dict()
        found["saved"] = {step: _differences(_ema_file(store_dir, step), want) for step in save_at if step == until}
        found["grid"] = _differences(sampled.state_dict(), want) + ([] if os.path.exists(grid) else ["no grid"])
        found["num_updates"] = run.ema.num_updates
    return found


def test_sharded_ema_is_bit_identical_to_the_gathered_one_and_reshards(shards, tmp_path):
    cfg = {**TINY, "data": {**TINY["data"], "path": shards}, "train": {**TINY["train"], "zero_stage": 3}}
    store = str(tmp_path / "checkpoints")

    first = run_ranks(train, 2, cfg, store, 3, (3,))[0]
    assert first["saved"] == {3: []} and first["grid"] == [] and first["num_updates"] == 3

    shrunk = run_ranks(train, 1, cfg, store, 4, (4,))[0]  # 2 -> 1, then a step on one rank
    assert shrunk["resumed_from"] == 3 and shrunk["restored"] == []
    assert shrunk["saved"] == {4: []} and shrunk["grid"] == [] and shrunk["num_updates"] == 4

    grown = run_ranks(train, 2, cfg, store, 5, (5,))[0]  # 1 -> 2: step-4 was written by one rank
    assert grown["resumed_from"] == 4 and grown["restored"] == []
    assert grown["saved"] == {5: []} and grown["grid"] == [] and grown["num_updates"] == 5
