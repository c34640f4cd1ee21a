"""Resuming ZeRO-1/2/3 on another world size, at the level of the training loop (no Ray).

The trainer's own loop (trainer.loop.run.TrainingRun: DeepSpeed engine, streamed MDS shards, EMA,
CheckpointManager) runs in real gloo processes. For every ZeRO stage:
* 2 -> 1: a 2-worker run saves at step 2; a 1-worker run resumes from it and saves at step 3;
* 1 -> 2: a 2-worker run resumes that 1-worker checkpoint.
After each resume the engine's optimizer state, gathered per parameter by DeepSpeed's own accessors,
equals the saved state exactly (fp32 master, exp_avg, exp_avg_sq, step), and the losses of steps 3
and 4 match an uninterrupted 2-worker run's.

Tolerance of the losses: LOSS_RTOL. The math of a step does not depend on the split (every sample's
t, noise and label dropout are keyed to (seed, step, sample key); the global batch is the same set of
samples), so only fp32 reduction order differs: 2 ranks x 1 micro-batch average two gradients in one
all-reduce, 1 rank x 2 micro-batches accumulates them; the weights then differ in the last bits,
which moves a loss of ~1 by ~1e-7 over a few steps. A wrong split (other samples or other noise)
moves it by ~1e-2.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.data_helpers import run_ranks
from tests.test_trainer_support import TINY

pytestmark = pytest.mark.slow
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data import prepare_dataset
    from trainer.config import config_from_dict

    cfg = config_from_dict(TINY)
    return prepare_dataset(cfg.data, str(tmp_path_factory.mktemp("elastic-data"))).path


def train(rank: int, world: int, cfg_dict: dict, store_dir: str, until: int, save_at: tuple[int, ...]) -> dict:
    """One rank of the trainer's loop: resume from store_dir if it holds a checkpoint, step to `until`.
    After a resume, rank 0 compares the engine's state with the checkpoint it came from, here in the
    rank, where the collective that consolidates it runs."""
    import torch.distributed as dist

    from trainer.config import config_from_dict
    from trainer.loop.run import TrainingRun, WorkerContext
    from trainer.checkpoint.repartition import consolidated_engine_state

    cfg = config_from_dict(cfg_dict)
    run = TrainingRun(cfg, WorkerContext(store_dir, os.path.dirname(store_dir), "", ""), rank, world)
    run.setup()
    resumed_from = run.progress.step
    restored = consolidated_engine_state(run.engine) if resumed_from else None  # collective
    differences = _differences(restored, os.path.join(store_dir, f"step-{resumed_from}")) \
        if restored is not None and rank == 0 else []
    losses = {}
    while run.progress.step < until:
        loss, _, _ = run.train_step()
        run.progress.step += 1
        run.progress.samples_seen += cfg.global_batch
        total = loss.detach().clone()
        dist.all_reduce(total)  # the global batch's mean loss
        losses[run.progress.step] = total.item() / world
        if run.progress.step in save_at:
            run.save_checkpoint()
    run.checkpoints.close()
    run.loader.close()
    return {"losses": losses, "split": run.split, "resumed_from": resumed_from, "differences": differences}


def _differences(restored: dict, step_dir: str) -> list[str]:
    """Where the engine's gathered state differs from the checkpoint's, per parameter and kind."""
    from trainer.export import consolidated_model_weights
    from trainer.checkpoint.repartition import KINDS, ZeroCheckpoint

    saved = ZeroCheckpoint(step_dir)
    found = [] if sorted(restored) == sorted(saved.names()) else ["parameter names differ"]
    found += [f"{name} {kind}" for name, kinds in restored.items() for kind in KINDS
              if not torch.equal(kinds[kind], saved.full(name, kind))]
    # our reading of the shards agrees with DeepSpeed's own consolidation of the weights
    found += [f"{name}: ZeroCheckpoint vs zero_to_fp32" for name, tensor in consolidated_model_weights(step_dir).items()
              if not torch.equal(saved.full(f"denoiser.{name}"), tensor)]
    return found


def _assert_same_losses(got: dict, want: dict, steps: list[int]) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), f"step {step}: {got[step]} vs {want[step]}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_state_resumes_exactly_on_another_world_size(stage, shards, tmp_path):
    cfg = {**TINY, "data": {**TINY["data"], "path": shards}, "train": {**TINY["train"], "zero_stage": stage}}
    store = str(tmp_path / "run" / "checkpoints")

    # an uninterrupted 2-worker run: the reference for every loss below. Its step-2 checkpoint (a save
    # changes nothing of the run) is where the 2-worker run would have stopped: copied, not run again
    reference_store = str(tmp_path / "reference" / "checkpoints")
    reference = run_ranks(train, 2, cfg, reference_store, 4, (2,))[0]
    assert reference["split"].grad_accum == 1 and reference["resumed_from"] == 0
    shutil.copytree(os.path.join(reference_store, "step-2"), os.path.join(store, "step-2"))
    # 2 -> 1: one worker (2 accumulation steps) resumes the 2-worker step-2 checkpoint and saves at step 3;
    # 1 -> 2: two workers resume that 1-worker checkpoint for step 4
    shrunk = run_ranks(train, 1, cfg, store, 3, (3,))[0]
    assert shrunk["split"].world_size == 1 and shrunk["split"].grad_accum == 2
    assert shrunk["resumed_from"] == 2 and shrunk["differences"] == []
    grown = run_ranks(train, 2, cfg, store, 4, ())[0]
    assert grown["resumed_from"] == 3 and grown["differences"] == []
    _assert_same_losses({**shrunk["losses"], **grown["losses"]}, reference["losses"], [3, 4])
