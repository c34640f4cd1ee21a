"""A committed checkpoint altered in place, its size unchanged, is never loaded (the COMMITTED marker's
checksums, trainer/checkpoint/store.py).

The session's reference run (tests/conftest.py, zero2_reference: step-8 and step-12 kept) is copied and
a byte of its newest ema.pt flipped. `dip sample`, `dip export` and the eval pool's loader (given the
eval hook's link to that ema.pt) refuse that step with the reason; an export of the checkpoints
directory takes step-8 with a warning naming the file; a run resumed there warns the same, resumes from
step-8 and writes a step-12 bit-identical to the reference's.

step-8 is first rewritten as this trainer wrote checkpoints before checksums and elastic resume (a
sizes-only marker; a train_state without batch_split / resizes / non-finite counters, each rank's RNG
with its per-rank generator): such checkpoints still resume on their own world size, bit-identically.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

import pytest

from tests.test_checkpoint_store import _flip_a_byte
from tests.test_trainer_support import (assert_bit_identical, final_weights, metric_history, ray_cluster,  # noqa: F401
                                        tiny_config)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def checkpoint_warnings():
    """The dip.checkpoint warnings of this process, as text (whatever configured the "dip" loggers)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("dip.checkpoint")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def as_written_before_checksums_and_elastic(store, step: int) -> None:
    """Rewrite step-N in the layout of the commit before this round's (3f18f94): its train_state.pt
    fields and a COMMITTED marker that records sizes only."""
    import torch

    path = store.step_path(step, "train_state.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("batch_split", "resizes", "nonfinite_steps", "rollbacks"):
        del state[key]
    for rank in state["ranks"]:
        rank["rng"]["generator"] = torch.Generator().manual_seed(7).get_state()  # the old per-rank stream
    torch.save(state, path)
    marker_path = store.step_path(step, "COMMITTED")
    with open(marker_path) as f:
        marker = json.load(f)
    marker["files"] = {rel: os.path.getsize(store.step_path(step, rel)) for rel in marker["files"]}
    with open(marker_path, "w") as f:
        json.dump(marker, f)
    assert store.verify(step, deep=True).ok  # sizes only: nothing to checksum


def test_an_altered_checkpoint_is_refused_by_sample_and_export_and_skipped_by_resume(tmp_path, capsys, ray_cluster,  # noqa: F811
                                                                                     zero2_reference):
    from cluster.cli.main import main
    from cluster.driver.launch import launch
    from cluster.driver.prepare import run_paths
    from trainer.checkpoint.store import CheckpointStore
    from trainer.eval.generation import load_eval_model
    from trainer.eval.hook import EvalHook

    reference = CheckpointStore(zero2_reference.checkpoint_dir)
    assert reference.steps() == [8, 12]
    cfg = tiny_config(tmp_path, "altered")
    shutil.copytree(reference.root, run_paths(cfg).checkpoint_uri)
    store = CheckpointStore(run_paths(cfg).checkpoint_uri)
    step12 = store.step_path(12)
    _flip_a_byte(os.path.join(step12, "ema.pt"))
    as_written_before_checksums_and_elastic(store, 8)
    assert store.verify(12).ok  # by size it looks committed and complete
    why = "ema.pt was altered in place: its xxh3_64 checksum is "

    assert main(["sample", "--checkpoint", step12, "--steps", "1", "--out", str(tmp_path / "grid.png")]) == 2
    assert capsys.readouterr().err.startswith(f"dip sample: error: checkpoint {step12} cannot be used: {why}")
    assert main(["export", step12, "--out", str(tmp_path / "model.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"dip export: error: checkpoint {step12} cannot be exported: {why}")
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "model.pt").exists()
    pinned = EvalHook(cfg, store)._pin(12)  # what the eval hook hands the pool (its own link to ema.pt)
    with pytest.raises(ValueError, match=f"checkpoint {pinned} cannot be used: {why}"):
        load_eval_model(pinned)  # what every eval actor loads a checkpoint with
    shutil.rmtree(os.path.dirname(pinned))
    with checkpoint_warnings() as warnings:
        assert main(["export", store.root, "--out", str(tmp_path / "model.pt")]) == 0
    assert f"ema weights of {store.step_path(8)} ->" in capsys.readouterr().out
    assert any(w.startswith(f"skipping checkpoint {step12}: {why}") for w in warnings), warnings

    capsys.readouterr()
    run = launch(cfg)
    # the workers' (rank 0's, forwarded by Ray): they checksum each file as they load it, the driver reads
    # only the marker and the train state
    out = capsys.readouterr()
    assert f"skipping checkpoint {step12}: {why}" in out.out + out.err, out.err[-4000:]
    assert run.status == "FINISHED" and run.steps == 12
    assert sorted(metric_history(run.tracking_uri, run.mlflow_run_id)) == [9, 10, 11, 12]  # resumed from step 8
    assert store.verify(12, deep=True).ok  # written again, whole
    model, ema = final_weights(step12)
    ref_model, ref_ema = final_weights(reference.step_path(12))
    assert_bit_identical(model, ref_model, "model weights")
    assert_bit_identical(ema, ref_ema, "EMA weights")
