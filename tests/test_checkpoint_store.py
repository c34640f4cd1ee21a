"""The commit protocol of step-N/ directories on a real (local) filesystem."""
import json
import logging
import os
import threading
import time

import pytest
import torch
import xxhash

from trainer.checkpoint.store import MARKER, CheckpointStore, step_name


def _write_rank_files(store, step, rank, attempt, payload=b"x" * 100):
    rel = f"{step_name(step)}/shard-{rank}.pt"
    record = store.write_stream(rel, lambda f: f.write(payload))
    store.report_done(step, rank, attempt, {f"shard-{rank}.pt": record})


def _commit(store, step, world=2, attempt="a1"):
    for rank in range(world):
        _write_rank_files(store, step, rank, attempt)
    files = store.wait_for_ranks(step, world, attempt, timeout_s=5)
    store.commit(step, files, {"world_size": world})


def test_a_step_counts_only_after_the_marker(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    for rank in range(2):
        _write_rank_files(store, 10, rank, "a1")
    assert store.steps() == [10]
    assert store.latest_committed() is None and not store.verify(10).ok
    files = store.wait_for_ranks(10, 2, "a1", timeout_s=5)
    checksum = xxhash.xxh3_64(b"x" * 100).hexdigest()  # computed while writing: nothing was read back
    assert files == {f"shard-{r}.pt": {"size": 100, "checksum": checksum, "algorithm": "xxh3_64", "chunk_bytes": 1 << 20,
                                     "chunks": [checksum]} for r in (0, 1)}
    store.commit(10, files, {"world_size": 2})
    assert store.verify(10).ok and store.latest_committed() == 10
    marker = json.loads((tmp_path / "ckpt" / "step-10" / MARKER).read_text())
    assert marker["step"] == 10 and marker["files"] == files


def test_truncated_and_unmarked_checkpoints_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    _commit(store, 5)
    _commit(store, 10)
    for rank in range(2):
        _write_rank_files(store, 15, rank, "a1")  # never committed: a crash before the marker
    with open(tmp_path / "ckpt" / "step-10" / "shard-1.pt", "r+b") as f:
        f.truncate(40)  # a torn write
    with caplog.at_level(logging.WARNING, logger="dip.checkpoint"):
        assert store.latest_committed() == 5
    text = caplog.text
    assert "step-15" in text and "no COMMITTED marker" in text
    assert "step-10" in text and "shard-1.pt is truncated" in text


def test_a_missing_file_or_garbled_marker_is_not_loadable(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    _commit(store, 1)
    _commit(store, 2)
    os.remove(tmp_path / "ckpt" / "step-2" / "shard-0.pt")
    assert "shard-0.pt is missing" in store.verify(2).reason
    (tmp_path / "ckpt" / "step-1" / MARKER).write_text("{not json")
    assert "unreadable" in store.verify(1).reason
    assert store.latest_committed(warn=False) is None


def _flip_a_byte(path, offset: int | None = None) -> None:
    """Alter a file in place, its size unchanged (bit rot, a bad copy, a stray write)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_file_altered_in_place_fails_its_checksum_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    _commit(store, 5)
    _commit(store, 10)
    _flip_a_byte(tmp_path / "ckpt" / "step-10" / "shard-1.pt")
    assert store.verify(10).ok  # sizes only: a listing cannot see it
    assert store.verify(10, deep=["shard-0.pt"]).ok and store.verify(10, only=["shard-0.pt"], deep=True).ok
    reason = store.verify(10, deep=True).reason
    assert reason.startswith("shard-1.pt was altered in place: its xxh3_64 checksum is ")
    with caplog.at_level(logging.WARNING, logger="dip.checkpoint"):
        assert store.latest_committed(deep=True) == 5
    assert "skipping checkpoint" in caplog.text and "step-10: shard-1.pt was altered in place" in caplog.text
    assert "not listed" in store.verify(10, only=["ema.pt"]).reason


def test_a_marker_written_before_checksums_is_still_valid_by_size(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    size = store.write_stream("step-3/shard-0.pt", lambda f: f.write(b"y" * 64))["size"]
    store.commit(3, {"shard-0.pt": size}, {"world_size": 1})  # the old format: {file: size}
    assert store.verify(3, deep=True).ok and store.latest_committed(deep=True) == 3
    with open(tmp_path / "ckpt" / "step-3" / "shard-0.pt", "ab") as f:
        f.write(b"!")
    assert "truncated or altered (65 bytes, marker says 64)" in store.verify(3, deep=True).reason


def test_commit_waits_for_every_rank_of_this_attempt_only(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    # a dead attempt's note for rank 1 must not count for the new attempt
    _write_rank_files(store, 20, 1, "dead-attempt")
    _write_rank_files(store, 20, 0, "new")
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish writing"):
        store.wait_for_ranks(20, 2, "new", timeout_s=0.3)

    def late_rank():
        time.sleep(0.3)
        _write_rank_files(store, 20, 1, "new")

    thread = threading.Thread(target=late_rank)
    thread.start()
    files = store.wait_for_ranks(20, 2, "new", timeout_s=10)
    thread.join()
    assert set(files) == {"shard-0.pt", "shard-1.pt"}


def test_prune_keeps_the_newest_k_and_never_what_is_newer_than_the_last_commit(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    for step in (10, 20, 30, 40):
        _commit(store, step)
    for rank in range(2):
        _write_rank_files(store, 25, rank, "a1")  # an old leftover (older than the newest commit)
        _write_rank_files(store, 50, rank, "a1")  # in flight: newer than the newest commit
    deleted = store.prune(keep=2)
    assert sorted(deleted) == [10, 20, 25]
    assert store.steps() == [30, 40, 50]
    assert store.committed_steps(warn=False) == [30, 40]


def test_prune_with_keep_one_keeps_the_last_committed(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    _commit(store, 1)
    for rank in range(2):
        _write_rank_files(store, 2, rank, "a1")  # step 2 not committed yet
    store.prune(keep=1)
    assert store.latest_committed(warn=False) == 1 and store.steps() == [1, 2]


def test_discard_after_removes_leftovers_newer_than_the_resume_point(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    _commit(store, 4)
    for rank in range(2):
        _write_rank_files(store, 8, rank, "dead")
    assert store.discard_after(4) == [8]
    assert store.steps() == [4]
    assert store.discard_after(None) == [4] and store.steps() == []


def test_torch_files_round_trip_with_weights_only(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    state = {"w": torch.randn(3, 4), "step": 7}
    record = store.write_stream("step-7/state.pt", lambda f: torch.save(state, f))
    written = (tmp_path / "ckpt" / "step-7" / "state.pt").read_bytes()
    assert record["size"] == len(written) and record["checksum"] == xxhash.xxh3_64(written).hexdigest()
    loaded = torch.load(store.open_file(7, "state.pt"), weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7


def test_stop_request_round_trip(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    assert not store.stop_requested()
    store.request_stop()
    assert store.stop_requested()
    store.clear_stop_request()
    assert not store.stop_requested()
    store.clear_stop_request()  # idempotent


def test_a_resize_request_is_answered_by_its_id_in_its_own_note(tmp_path):
    store = CheckpointStore(str(tmp_path))
    assert store.resize_request() is None and not store.resize_requested()
    request_id = store.request_resize(4, expires_in_s=60)
    pending = store.resize_request()
    assert pending["id"] == request_id and pending["to_workers"] == 4 and store.resize_requested()
    assert store.resize_checkpoint(request_id) is None  # not answered yet
    assert not store.answer_resize("another-request", 6)  # an answer to another request is not written
    assert store.resize_checkpoint(request_id) is None
    assert store.answer_resize(request_id, 6)
    assert store.resize_checkpoint(request_id) == 6
    assert store.read_json("RESIZE_REQUESTED") == pending  # the answer never rewrites the request note
    # a later request is not answered by the earlier answer
    store.withdraw_resize_request(request_id)
    assert not store.resize_requested() and store.resize_checkpoint(request_id) is None
    later = store.request_resize(4, expires_in_s=60)
    assert later != request_id and store.resize_checkpoint(later) is None


def test_a_request_withdrawn_before_rank_0_answers_is_not_recreated(tmp_path, caplog):
    """The driver gave up (deleted its request) while the workers were writing the checkpoint: rank 0's
    answer writes nothing, and the next stop check (the restarted group's) sees no request."""
    store = CheckpointStore(str(tmp_path))
    request_id = store.request_resize(2, expires_in_s=60)
    seen_at_stop_check = store.resize_request()["id"]  # rank 0 saw it, then wrote its checkpoint...
    store.withdraw_resize_request(request_id)  # ...while the driver timed out and withdrew it
    with caplog.at_level(logging.WARNING, logger="dip.checkpoint"):
        assert not store.answer_resize(seen_at_stop_check, 6)
    assert f"resize request {request_id} was withdrawn" in caplog.text
    assert not os.path.exists(tmp_path / "RESIZE_REQUESTED")
    assert sorted(os.listdir(tmp_path)) == []  # no request, no answer
    assert store.resize_request() is None and not store.resize_requested()
    # a newer request in the meantime is not the one rank 0 saw: not answered either
    newer = store.request_resize(2, expires_in_s=60)
    assert not store.answer_resize(seen_at_stop_check, 6) and store.resize_checkpoint(newer) is None
    assert store.resize_request()["id"] == newer


def test_an_expired_request_is_no_request(tmp_path):
    """A request carries its expiry: one left behind by a driver that died is ignored, never answered."""
    store = CheckpointStore(str(tmp_path))
    request_id = store.request_resize(2, expires_in_s=0.2)
    assert store.resize_requested()
    time.sleep(0.3)
    assert store.resize_request() is None and not store.resize_requested()
    assert not store.answer_resize(request_id, 6)
    assert store.resize_checkpoint(request_id) is None
    # a note from before requests had ids (an older driver's) is ignored too
    store.write_json("RESIZE_REQUESTED", {"requested_at": time.time(), "to_workers": 2})
    assert not store.resize_requested()
    # a run's start clears requests and stray answers of earlier attempts
    store.write_json(f"RESIZE_ANSWERED-{request_id}", {"id": request_id, "checkpoint_step": 6})
    store.clear_resize_request()
    assert sorted(os.listdir(tmp_path)) == []
