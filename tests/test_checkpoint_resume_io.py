"""A resume reads each byte of a checkpoint once: the bytes an S3 server sends, counted at the server.

A moto S3 server runs in this process behind a WSGI middleware that counts the response bytes of every
GET per object. The trainer's loop (TrainingRun, CheckpointManager.resume) runs in real gloo processes
(tests.data_helpers.run_ranks) with checkpoint.path on that server: 3 ranks save step 1, then 3 ranks
resume it (the same world size) and 2 ranks resume it (re-partitioned), for ZeRO-2 and ZeRO-3. The bytes
read from step-1/ are held to the bounds docs/training.md states ("Resume I/O").
"""
from __future__ import annotations

import pytest

from tests.data_helpers import free_port, run_ranks
from tests.s3_counting import CountingS3
from tests.test_trainer_support import TINY

pytestmark = pytest.mark.slow
RANKS_TIMEOUT_S = 900  # 3 DeepSpeed ranks on a loaded 2-core machine take minutes to start


@pytest.fixture(scope="module")
def counting_s3():
    server = CountingS3(free_port(), "dip-io")
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data import prepare_dataset
    from trainer.config import config_from_dict

    return prepare_dataset(config_from_dict(TINY).data, str(tmp_path_factory.mktemp("io-data"))).path


def save_or_resume(rank: int, world: int, cfg_dict: dict, store_uri: str, run_dir: str, save: bool) -> dict:
    """One rank of the trainer's loop: setup (CheckpointManager.resume), then with save, one step and
    a checkpoint of step 1."""
    from trainer.config import config_from_dict
    from trainer.loop.run import TrainingRun, WorkerContext

    run = TrainingRun(config_from_dict(cfg_dict), WorkerContext(store_uri, run_dir, "", ""), rank, world)
    run.setup()
    resumed_at = run.progress.step
    if save:
        run.train_step()
        run.progress.step += 1
        run.save_checkpoint()
    run.checkpoints.close()
    run.loader.close()
    return {"resumed_at": resumed_at}


def _step_bytes(sent: dict, step: int) -> dict[str, int]:
    marker = f"/step-{step}/"
    return {path.split(marker, 1)[1]: count for path, count in sent.items() if marker in path}


@pytest.mark.parametrize("stage", [2, 3])
def test_a_resume_reads_each_byte_once_same_world_and_only_what_it_needs_re_partitioned(stage, counting_s3, shards,
                                                                                        tmp_path):
    from trainer.checkpoint.reader import CHUNK_BYTES
    from trainer.checkpoint.store import CheckpointStore

    cfg = {**TINY, "data": {**TINY["data"], "path": shards}, "train": {**TINY["train"], "zero_stage": stage},
           "cluster": {**TINY["cluster"], "num_workers": 3}}  # a global batch of 6: 3 or 2 ranks keep it
    uri = f"s3://dip-io/zero{stage}"
    run_ranks(save_or_resume, 3, cfg, uri, str(tmp_path / "save"), True, timeout_s=RANKS_TIMEOUT_S)
    store = CheckpointStore(uri)
    sizes = {rel: record["size"] for rel, record in store.read_marker(1)["files"].items()}
    total = sum(sizes.values())
    optim = sum(size for rel, size in sizes.items() if rel.endswith("optim_states.pt"))
    train_state = sizes["train_state.pt"]
    counting_s3.take()

    # the same world size: every file once, and the files every rank needs (train state, shared model states)
    results = run_ranks(save_or_resume, 3, cfg, uri, str(tmp_path / "same"), False, timeout_s=RANKS_TIMEOUT_S)
    assert [r["resumed_at"] for r in results] == [1, 1, 1]
    read = _step_bytes(counting_s3.take(), 1)
    marker_reads = read.pop("COMMITTED", 0)
    shared = train_state + (sizes["mp_rank_00_model_states.pt"] if stage <= 2 else 0)
    assert sum(read.values()) <= 1.1 * total + 2 * shared, (read, sizes)
    assert read["ema.pt"] == sizes["ema.pt"]  # rank 0 alone
    assert all(read[rel] == size for rel, size in sizes.items() if rel.endswith("optim_states.pt")), (read, sizes)
    assert marker_reads <= 3 * 3 * 2048

    # re-partitioned onto 2 ranks: ranged reads of the flat partitions (docs/training.md, "Resume I/O")
    results = run_ranks(save_or_resume, 2, cfg, uri, str(tmp_path / "resharded"), False, timeout_s=RANKS_TIMEOUT_S)
    assert [r["resumed_at"] for r in results] == [1, 1]
    read = _step_bytes(counting_s3.take(), 1)
    read.pop("COMMITTED", 0)
    # ZeRO-3: each element of the fp32 master and both moments once, fetched in whole 1 MiB chunks: the
    # saved rank-1 file holds pieces of every parameter that new ranks 0 and 1 both need, and this tiny
    # model's pieces are smaller than a chunk, so both fetch all of it (docs/training.md); ZeRO-1/2 (fp32
    # here): every rank reads the whole fp32 master (a third of the optimizer files; the model each rank
    # holds), the moments once
    per_file = optim / 3
    needed = (1 + 2 + 1) * per_file if stage == 3 else 2 * optim / 3 + 2 * optim / 3
    files_opened = 3 + 1  # per rank: the optimizer files and one model-states file
    overhead = 2 * files_opened * 3 * CHUNK_BYTES  # per rank and file: its zip directory, pickle, range edges
    bound = needed + 2 * train_state + sizes["ema.pt"] + overhead
    assert sum(read.values()) <= bound, (read, sizes, bound)
    if stage == 3:  # the saved rank-0 and rank-2 files: one new rank each, and once
        for rank in (0, 2):
            rel = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            assert read[rel] <= sizes[rel] + 3 * 3 * CHUNK_BYTES, (rel, read[rel], sizes[rel])
