"""Pure pieces of checkpointing: RNG capture, host snapshots, fault notes, the train-state format."""
import io
import random

import numpy as np
import pytest
import torch

from trainer.checkpoint.deepspeed_io import to_host
from trainer.checkpoint.manager import ema_file_payload
from trainer.checkpoint.rng_state import capture_rng, restore_rng


def test_rng_state_round_trips_through_a_weights_only_file():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    buffer = io.BytesIO()
    torch.save(capture_rng(), buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    buffer.seek(0)
    restore_rng(torch.load(buffer, weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(1).item())
    assert got == expected


def test_to_host_copies_so_training_can_mutate_the_originals():
    weight = torch.ones(3)
    state = {"module": {"w": weight}, "list": [weight], "tuple": (weight, 7), "name": "x",
             "shapes": [{"w": torch.Size([3])}]}
    snap = to_host(state)
    assert type(snap["shapes"][0]["w"]) is torch.Size  # ZeRO-3 consolidation calls .numel() on these
    weight.add_(1)  # the optimizer steps on after the snapshot
    assert torch.equal(snap["module"]["w"], torch.ones(3))
    assert torch.equal(snap["list"][0], torch.ones(3)) and snap["tuple"][1] == 7 and snap["name"] == "x"
    assert snap["module"]["w"].data_ptr() != weight.data_ptr()


def test_ema_file_is_what_sampling_loads():
    from models.registry import dip_config

    config = dip_config("DiP-T/16", num_classes=4)
    payload = ema_file_payload(config, {"w": torch.zeros(2)})
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["model_config"]["num_classes"] == 4 and loaded["model_config"]["patch_size"] == 16
    assert torch.equal(loaded["state_dict"]["w"], torch.zeros(2))


def test_faults_fire_once_per_run(tmp_path, monkeypatch):
    from trainer import faults

    monkeypatch.setenv("DIP_FAULT_DIR", str(tmp_path))
    assert faults._fire_once("x") is True
    assert faults._fire_once("x") is False  # a restarted worker group runs clean
    monkeypatch.setenv("DIP_FAULT_KILL_AT", "5:1")
    faults.after_step(5, 0, 2)  # another rank: nothing happens
    faults.after_step(4, 1, 2)  # another step: nothing happens
    assert not (tmp_path / "fired-kill-at-5-1").exists()
    assert faults.forwarded_env() == {"DIP_FAULT_DIR": str(tmp_path), "DIP_FAULT_KILL_AT": "5:1"}


def test_interval_meter_reports_throughput_and_data_wait_share():
    from trainer.loop.step_metrics import IntervalMeter

    meter = IntervalMeter()
    meter.started -= 2.0  # two seconds ago
    meter.add(data_wait_s=0.5)
    meter.add(data_wait_s=0.5)
    figures = meter.figures(images_per_step=16, flops_per_img=None, device_name=None, world_size=2)
    assert figures["images_per_s"] == pytest.approx(16, rel=0.05)
    assert figures["data_wait_share"] == pytest.approx(0.5, rel=0.05)
    assert figures["step_time_s"] == pytest.approx(1.0, rel=0.05)
    assert "tflops_per_s" not in figures and "mfu" not in figures  # no FLOP count given: neither figure


def test_deepspeed_config_follows_the_run_config():
    from trainer.config import config_from_dict
    from trainer.loop.engine import deepspeed_config

    cfg = config_from_dict({}, ["data.batch_size=8", "train.grad_accum=4", "train.zero_stage=3",
                                "train.precision=bf16", "optim.grad_clip=1.0"])
    ds = deepspeed_config(cfg, cfg.batch_split(1))
    assert ds["train_batch_size"] == 8 * 4 * 1 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 3
    # the same global batch on 2 of an elastic [1, 2]: the accumulation is re-solved, the micro-batch kept
    elastic = config_from_dict({}, ["data.batch_size=8", "train.grad_accum=4", "cluster.num_workers=[1,2]"])
    half = deepspeed_config(elastic, elastic.batch_split(1))
    assert half["train_batch_size"] == 64 and half["gradient_accumulation_steps"] == 8
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["check_grad_overflow"] is True  # the non-finite skip under bf16 (trainer.loop.nonfinite)


def test_warmup_then_constant_learning_rate():
    from trainer.config import config_from_dict
    from trainer.loop.engine import build_optimizer

    cfg = config_from_dict({}, ["optim.lr=1e-3", "optim.warmup_steps=4"])
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), cfg)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def _writer(store, rank: int):
    """A CheckpointManager with only what its staging directory needs (no engine, loader or EMA)."""
    from trainer.checkpoint.manager import CheckpointManager, TrainProgress

    return CheckpointManager(store, rank, 2, None, engine=None, loader=None, progress=TrainProgress(), ema=None,
                             identity=None, zero_stage=2, keep=2, async_save=False, commit_timeout_s=5)


def test_staging_dirs_of_sigkilled_writers_are_swept_at_start_and_live_ones_kept(tmp_path, monkeypatch):
    """A SIGKILLed rank never reaches CheckpointManager.close: its staging dir is removed by the next writer."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from trainer.checkpoint.store import CheckpointStore

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    store = CheckpointStore(str(tmp_path / "ckpt"))
    live = _writer(store, 1)  # a live writer
    code = ("import sys; from trainer.checkpoint.store import CheckpointStore; "
            "from tests.test_checkpoint_units import _writer; "
            "print(_writer(CheckpointStore(sys.argv[1]), 0).staging_dir, flush=True); sys.stdin.read()")
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ckpt")], cwd=repo, text=True,
                              env={**os.environ, "TMPDIR": str(temp), "PYTHONPATH": repo},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    dead_dir = writer.stdout.readline().strip()
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    assert os.path.dirname(dead_dir) == str(temp) and os.path.isdir(dead_dir)
    foreign = temp / "dip-ckpt-staging-not-ours"  # not in our naming scheme: never touched
    foreign.mkdir()

    fresh = _writer(store, 0)
    assert not os.path.exists(dead_dir)
    assert os.path.isdir(live.staging_dir) and os.path.isdir(fresh.staging_dir) and foreign.is_dir()
    live.close()
    fresh.close()
    assert sorted(os.listdir(temp)) == ["dip-ckpt-staging-not-ours"]


def test_a_ranks_files_are_written_side_by_side_and_one_failed_file_fails_the_save(tmp_path):
    """CheckpointManager._write sends a rank's files out at once (rank 0 has up to four): every write here
    waits on a barrier of all of them, which breaks (timeout) if they went one after the other. A file that
    fails fails the save, and no report of the rank's files is written (the step is never committed)."""
    import os
    import threading

    from trainer.checkpoint.manager import SaveRequest
    from trainer.checkpoint.store import DONE_PREFIX, CheckpointStore

    files = [(f"f{i}.pt", {"w": torch.full((3,), float(i))}) for i in range(4)]
    together = threading.Barrier(len(files), timeout=20)

    class SideBySide(CheckpointStore):
        def write_stream(self, rel_path, write_fn):
            if rel_path.endswith(".pt"):  # the rank's files, not its report
                together.wait()  # raises BrokenBarrierError after 20 s unless all four are in flight
            if rel_path.endswith("f2.pt") and getattr(self, "fail_f2", False):
                raise OSError("disk full")
            return super().write_stream(rel_path, write_fn)

    store = SideBySide(str(tmp_path / "ckpt"))
    writer = _writer(store, 1)  # rank 1: writes and reports, rank 0 commits
    writer.attempt = "a1"
    writer._write(SaveRequest(6, files))
    report = store.read_json(f"step-6/{DONE_PREFIX}1.json")
    assert report["attempt"] == "a1" and sorted(report["files"]) == [rel for rel, _ in files]
    for rel, obj in files:
        assert torch.equal(torch.load(store.step_path(6, rel), weights_only=True)["w"], obj["w"])
        assert report["files"][rel]["size"] == os.path.getsize(store.step_path(6, rel))

    store.fail_f2 = True
    together.reset()
    with pytest.raises(OSError, match="disk full"):
        writer._write(SaveRequest(8, files))
    assert store.read_json(f"step-8/{DONE_PREFIX}1.json") is None
    writer.close()
