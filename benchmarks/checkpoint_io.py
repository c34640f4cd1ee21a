"""Resume I/O from S3: seconds and bytes the server sends while W ranks resume one checkpoint.

A moto S3 server runs in this process behind a WSGI middleware counting the response bytes of GETs.
2 ranks (gloo, the trainer's own loop: TrainingRun -> CheckpointManager.resume) train one step of the
model and checkpoint it to s3://; then 2 ranks (the same world size) and 4 ranks (re-partitioned)
resume it. Printed: the save's blocking seconds (the host snapshot with --async-save, the whole write
without) and its seconds until written and committed, slowest rank; per resume, the slowest rank's seconds
in CheckpointManager.resume and the bytes of step-N/ the server sent, as a multiple of the checkpoint's size.

Before/after: run each tree's own copy of this script (it puts its own tree first on sys.path, so
PYTHONPATH does not switch the code under test), e.g.
    python benchmarks/checkpoint_io.py --model DiP-S/16
    python /path/to/other/tree/benchmarks/checkpoint_io.py --model DiP-S/16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ and the packages


def rank_main(rank: int, world: int, cfg_dict: dict, uri: str, run_dir: str, save: bool) -> dict:
    """Resume (timed), and with save one step and a checkpoint."""
    from trainer.checkpoint.manager import CheckpointManager
    from trainer.config import config_from_dict
    from trainer.loop.run import TrainingRun, WorkerContext

    original, timed = CheckpointManager.resume, {}

    def resume(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timed["resume_s"] = time.perf_counter() - start

    CheckpointManager.resume = resume
    run = TrainingRun(config_from_dict(cfg_dict), WorkerContext(uri, run_dir, "", ""), rank, world)
    run.setup()
    blocked = total = None
    if save:
        run.train_step()
        run.progress.step += 1
        start = time.perf_counter()
        blocked = run.checkpoints.save()  # the snapshot (async) or the whole write (sync)
        run.checkpoints.wait()  # an async write: until this rank's files are written (rank 0: committed)
        total = time.perf_counter() - start
    run.checkpoints.close()
    run.loader.close()
    return {**timed, "step": run.progress.step, "save_blocking_s": blocked, "save_total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiP-S/16")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=32, help="images (the parameters do not depend on it)")
    parser.add_argument("--worlds", default="2,4", help="resume world sizes; the first one saves")
    parser.add_argument("--async-save", action="store_true", help="checkpoint.async_save=true (default: sync)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from data import prepare_dataset
    from tests.data_helpers import free_port, run_ranks
    from tests.s3_counting import CountingS3
    from trainer.config import config_from_dict

    worlds = [int(w) for w in args.worlds.split(",")]
    work = tempfile.mkdtemp(prefix="dip-ckpt-io-")
    cfg = {"model": {"name": args.model, "num_classes": 4},
           "data": {"path": "synthetic", "resolution": args.resolution, "batch_size": 1, "num_workers": 0,
                    "synthetic_images": 16, "synthetic_classes": 4, "seed": 0},
           "optim": {"lr": 1.0e-4, "ema_decay": 0.9, "warmup_steps": 2},
           "train": {"max_steps": 10, "zero_stage": args.stage, "precision": "fp32",
                     "grad_accum": max(worlds) // worlds[0]},
           "checkpoint": {"every_steps": 100, "keep": 2, "async_save": args.async_save},
           "samples": {"num_classes": 2, "per_class": 1, "steps": 2},
           "tracking": {"log_model": False}, "cluster": {"num_workers": worlds[0]}}
    cfg["data"]["path"] = prepare_dataset(config_from_dict(cfg).data, os.path.join(work, "data")).path
    counter = CountingS3(free_port(), "bench").start()
    uri = "s3://bench/run"
    saved = run_ranks(rank_main, worlds[0], cfg, uri, os.path.join(work, "save"), True, timeout_s=1200)
    from trainer.checkpoint.store import CheckpointStore

    marker = CheckpointStore(uri).read_marker(1)
    size = sum((r["size"] if isinstance(r, dict) else r) for r in marker["files"].values())
    report = {"model": args.model, "zero_stage": args.stage, "saved_by": worlds[0], "checkpoint_bytes": size,
              "async_save": args.async_save, "save_blocking_s": round(max(r["save_blocking_s"] for r in saved), 2),
              "save_total_s": round(max(r["save_total_s"] for r in saved), 2), "resumes": []}
    for world in worlds:
        counter.take()
        results = run_ranks(rank_main, world, cfg, uri, os.path.join(work, f"resume-{world}"), False, timeout_s=1200)
        sent = sum(n for path, n in counter.take().items() if "/step-1/" in path)
        report["resumes"].append({"ranks": world, "resume_s": round(max(r["resume_s"] for r in results), 2),
                                  "bytes": sent, "x_checkpoint": round(sent / size, 2)})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
