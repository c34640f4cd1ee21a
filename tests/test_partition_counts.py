"""Every read of a saved flat ZeRO partition checks its element count against the checkpoint's layout
(trainer/checkpoint/repartition.py): a truncated or altered partition tensor is refused with the file
and both counts, never read as other parameters' numbers. Real checkpoints of the trainer's own loop
(2 gloo ranks, ZeRO-2 and ZeRO-3), one rank's fp32 partition then cut short or lengthened."""
from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from tests.data_helpers import run_ranks
from tests.test_trainer_support import TINY

pytestmark = pytest.mark.slow
STAGES = (2, 3)


def _save_one_step(rank: int, world: int, configs: list[dict], store_dir: str) -> list[str]:
    """For each config: one step of the real loop, then a committed checkpoint; returns the step dirs."""
    from trainer.config import config_from_dict
    from trainer.loop.run import TrainingRun, WorkerContext

    dirs = []
    for index, cfg_dict in enumerate(configs):
        checkpoints = os.path.join(store_dir, str(index))
        run = TrainingRun(config_from_dict(cfg_dict), WorkerContext(checkpoints, store_dir, "", ""), rank, world)
        run.setup()
        run.train_step()
        run.progress.step += 1
        run.save_checkpoint()
        run.checkpoints.close()
        run.loader.close()
        dirs.append(os.path.join(checkpoints, "step-1"))
    return dirs


@pytest.fixture(scope="module")
def step_dirs(tmp_path_factory) -> dict[int, str]:
    from data import prepare_dataset
    from trainer.config import config_from_dict

    root = tmp_path_factory.mktemp("partition-counts")
    shards = prepare_dataset(config_from_dict(TINY).data, str(root / "data")).path
    configs = [{**TINY, "data": {**TINY["data"], "path": shards}, "train": {**TINY["train"], "zero_stage": stage}}
               for stage in STAGES]
    return dict(zip(STAGES, run_ranks(_save_one_step, 2, configs, str(root / "runs"), timeout_s=600)[0]))


def _altered_copy(step_dir: str, dest, rank: int, alter) -> str:
    """A copy of step_dir whose rank's optimizer file went through alter(optimizer_state_dict); its path."""
    from trainer.checkpoint.deepspeed_io import deepspeed_safe_globals

    shutil.copytree(step_dir, dest)
    path = os.path.join(dest, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        state = torch.load(path, weights_only=True)
    alter(state["optimizer_state_dict"])
    torch.save(state, path)
    return path


def _groups(stage: int) -> str:
    return "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"


@pytest.mark.parametrize("stage", STAGES)
def test_a_partition_cut_short_or_lengthened_is_refused_naming_the_file_and_both_counts(step_dirs, stage, tmp_path):
    from trainer.checkpoint.repartition import ZeroCheckpoint

    intact = ZeroCheckpoint(step_dirs[stage])  # the saved checkpoint reads as it is
    name = intact.names()[-1]
    assert intact.full(name).shape == intact._places[name].shape

    def cut_fp32(optimizer_state):
        flats = optimizer_state[_groups(stage)]
        held["fp32"] = flats[-1].numel()
        flats[-1] = flats[-1][:-5].clone()

    held: dict = {}
    path = _altered_copy(step_dirs[stage], tmp_path / "cut", 1, cut_fp32)
    with pytest.raises(ValueError) as refused:
        ZeroCheckpoint(str(tmp_path / "cut"))
    message = str(refused.value)
    assert message.startswith(f"{path}: its fp32") and f"holds {held['fp32'] - 5} elements" in message
    assert f"layout gives it {held['fp32']}" in message and "truncated or altered" in message

    def lengthen_moment(optimizer_state):
        base = optimizer_state["base_optimizer_state"] if stage <= 2 else optimizer_state["optimizer_state_dict"]
        states = base["state"] if isinstance(base, dict) else base
        first = states[sorted(states)[0]] if isinstance(states, dict) else states[0]
        held["exp_avg"] = first["exp_avg"].numel()
        first["exp_avg"] = torch.cat([first["exp_avg"], torch.zeros(3)])

    path = _altered_copy(step_dirs[stage], tmp_path / "long", 0, lengthen_moment)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: its exp_avg.* holds {held['exp_avg'] + 3} elements"):
        ZeroCheckpoint(str(tmp_path / "long"))


def test_a_read_beyond_what_the_partitions_hold_is_refused(step_dirs):
    """The per-read check behind the layout check: ZeRO-3 pieces that do not add up are an error, not a
    shorter tensor."""
    from trainer.checkpoint.lazy_files import LoadedTensor
    from trainer.checkpoint.repartition import ZeroCheckpoint

    ckpt = ZeroCheckpoint(step_dirs[3])
    name = ckpt.names()[-1]
    # as if a ranged read came back short
    ckpt._flats["fp32"][1] = [LoadedTensor(flat.slice(0, flat.numel() - 2)) for flat in ckpt._flats["fp32"][1]]
    with pytest.raises(ValueError, match=r"the ZeRO partitions hold \d+ of \d+ elements asked for"):
        ckpt.full(name)
