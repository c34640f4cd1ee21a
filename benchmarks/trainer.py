"""Trainer overhead and checkpoint blocking, measured on this machine.

1. Steady-state step time of the full trainer (Ray Train + DeepSpeed ZeRO-2, 2 workers x 1 core,
   streamed MDS shards, EMA, MLflow queue) against a bare single-process PyTorch loop (1 core) of the
   same model and per-worker batch (forward, backward, AdamW, EMA; tensors already in memory).
   Overhead = trainer step time / bare step time - 1 (target <= 10%). Also the bare loop as two
   processes at once (one per core): the share of the gap that is the machine, not the trainer.
2. How long a checkpoint save blocks the training loop: synchronous vs asynchronous writes
   (the trainer's own `checkpoint_blocking_s` metric, over several saves).

    python benchmarks/trainer.py [--steps 60] [--batch 8] [--resolution 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def bare_step_time(model_name: str, num_classes: int, batch: int, resolution: int, steps: int,
                   warmup: int) -> tuple[float, float]:
    """(median wall s, mean CPU s) per step of a plain one-process loop: the floor the trainer is measured against."""
    import torch

    from models.ema import EMA
    from models.registry import create_model
    from models.transport import FlowMatching

    torch.set_num_threads(1)  # one core, as one Ray worker gets
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes)
    ema = EMA(model, 0.99)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = FlowMatching(num_classes=num_classes)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1  # (B, 3, N, N)
    labels = torch.randint(0, num_classes, (batch,))
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            cpu_start = time.process_time()
        start = time.perf_counter()
        loss, _ = objective.loss(model, pixels, labels, generator=generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), (time.process_time() - cpu_start) / steps


def _bare_in_process(args: tuple, queue) -> None:
    queue.put(bare_step_time(*args))


def concurrent_bare_step_time(args: tuple, copies: int = 2) -> tuple[float, float]:
    """The bare loop run as `copies` processes at once, one per core, as the trainer's workers run:
    what the machine itself costs when every core computes (shared caches, memory bandwidth, the
    host), with no Ray, DeepSpeed or communication. Returns the first copy's (median wall s, CPU s)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queues = [ctx.SimpleQueue() for _ in range(copies)]
    procs = [ctx.Process(target=_bare_in_process, args=(args, q)) for q in queues]
    for proc in procs:
        proc.start()
    results = [q.get() for q in queues]
    for proc in procs:
        proc.join()
    return results[0]


def trainer_run(root: str, name: str, overrides: list[str]):
    from cluster.launch import launch
    from trainer.config import config_from_dict

    base = {
        "run_name": name, "output_dir": os.path.join(root, "runs"),
        "model": {"name": "DiP-T/16", "num_classes": 10},
        "data": {"path": "synthetic", "resolution": 32, "batch_size": 8, "num_workers": 0, "synthetic_images": 1000,
                 "synthetic_classes": 10},
        "optim": {"lr": 1e-3, "ema_decay": 0.99},
        "train": {"max_steps": 60, "zero_stage": 2, "precision": "fp32", "log_every": 10, "stop_check_every": 10},
        "checkpoint": {"every_steps": 100000, "keep": 2},
        "samples": {"num_classes": 1, "per_class": 1, "steps": 1},
        "cluster": {"num_workers": 2, "num_cpus": 2, "max_failures": 0, "dashboard": False},  # as measured in RESULTS
    }
    return launch(config_from_dict(base, overrides), echo=lambda text: None)


def history(summary, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(tracking_uri=summary.tracking_uri).get_metric_history(summary.mlflow_run_id, key)
    return sorted((m.step, m.value) for m in points)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="trainer steps per run (logged every 10)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per worker")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--saves", type=int, default=4, help="checkpoints per sync/async run")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    figures: dict = {"machine": f"{os.cpu_count()} CPU cores", "model": "DiP-T/16", "batch_per_worker": args.batch,
                     "resolution": args.resolution}
    with tempfile.TemporaryDirectory(prefix="dip-bench-trainer-") as root:
        common = [f"data.batch_size={args.batch}", f"data.resolution={args.resolution}"]
        # 1. steady state: no checkpoint inside the measured intervals (the only save is after the last step)
        run = trainer_run(root, "steady", common + [f"train.max_steps={args.steps}"])
        intervals = history(run, "step_time_s")[1:]  # the first interval holds start-up and JIT warm-up
        cpu_intervals = history(run, "cpu_s_per_step")[1:]
        trainer_s = statistics.median(v for _, v in intervals)
        trainer_cpu = statistics.median(v for _, v in cpu_intervals)
        bare_args = ("DiP-T/16", 10, args.batch, args.resolution, 30, 5)
        bare_s, bare_cpu = bare_step_time(*bare_args)
        both_s, both_cpu = concurrent_bare_step_time(bare_args)
        figures.update(bare_concurrent_step_s=both_s, bare_concurrent_cpu_s_per_step=both_cpu,
                       overhead_wall_vs_concurrent_bare=trainer_s / both_s - 1)
        figures.update(trainer_step_s=trainer_s, bare_step_s=bare_s, overhead_wall=trainer_s / bare_s - 1,
                       trainer_cpu_s_per_step=trainer_cpu, bare_cpu_s_per_step=bare_cpu,
                       overhead_cpu=trainer_cpu / bare_cpu - 1, trainer_intervals=[round(v, 4) for _, v in intervals])
        print(f"steady-state step, wall: trainer {trainer_s * 1000:.0f} ms (2 workers x ZeRO-2, median of "
              f"{len(intervals)} intervals) vs bare loop {bare_s * 1000:.0f} ms -> overhead "
              f"{100 * (trainer_s / bare_s - 1):+.1f}%")
        print(f"bare loop as 2 processes at once (one per core, no Ray / DeepSpeed): {both_s * 1000:.0f} ms "
              f"({100 * (both_s / bare_s - 1):+.1f}% vs alone) -> trainer overhead beyond that "
              f"{100 * (trainer_s / both_s - 1):+.1f}%")
        print(f"steady-state step, CPU time of one process: trainer rank 0 {trainer_cpu * 1000:.0f} ms vs bare loop "
              f"{bare_cpu * 1000:.0f} ms -> overhead {100 * (trainer_cpu / bare_cpu - 1):+.1f}%")
        # 2. checkpoint blocking: the same run, a save every 10 steps, written inline vs in the background
        for mode in ("sync", "async"):
            steps = 10 * args.saves
            run = trainer_run(root, f"ckpt-{mode}", common + [f"train.max_steps={steps}", "checkpoint.every_steps=10",
                                                              f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"])
            blocked = [v for _, v in history(run, "checkpoint_blocking_s")]
            figures[f"checkpoint_blocking_{mode}_s"] = statistics.mean(blocked)
            figures[f"checkpoint_blocking_{mode}_all_s"] = [round(v, 4) for v in blocked]
            print(f"checkpoint save blocks the loop ({mode}): mean {statistics.mean(blocked) * 1000:.0f} ms over "
                  f"{len(blocked)} saves")
        ratio = figures["checkpoint_blocking_sync_s"] / figures["checkpoint_blocking_async_s"]
        figures["sync_over_async"] = ratio
        print(f"async saving blocks {ratio:.1f}x less than sync")
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
