"""Trainer overhead and checkpoint blocking, measured on this machine.

1. Steady-state step time of the full trainer (Ray Train + DeepSpeed ZeRO-2, 2 workers x 1 core,
   streamed MDS shards, EMA, MLflow queue) against a bare single-process PyTorch loop (1 core) of the
   same model and per-worker batch (forward, backward, AdamW, EMA; tensors already in memory).
   Overhead = trainer step time / bare step time - 1 (target <= 10%). Split into parts, each measured:
   the bare loop as two processes at once (one per core: what the machine itself costs), the trainer's
   own loop without Ray (trainer.loop.run.TrainingRun on 2 plain gloo processes: DeepSpeed, loader, EMA),
   and ZeRO-2's per-step traffic alone (one gradient all-reduce + one parameter all-gather over gloo).
   Each round runs all of them back to back and the figures are medians of per-round ratios, as
   this machine's speed drifts by tens of percent between minutes.
2. How long a checkpoint save blocks the training loop: synchronous vs asynchronous writes
   (the trainer's own `checkpoint_blocking_s` metric, over several saves).

    python benchmarks/trainer.py [--steps 150] [--batch 8] [--resolution 32] [--repeats 3] [--saves 4]
                                 [--json out.json]
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as trainer.loop.engine.build_optimizer
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


def _bare_rank(rank: int, world: int, port: int, queue, args: tuple) -> None:
    result = bare_step_time(*args)  # no process group: the copies never talk to each other
    if rank == 0:
        queue.put(result)


def concurrent_bare_step_time(args: tuple, copies: int = 2) -> tuple[float, float]:
    """The bare loop run as `copies` processes at once, one per core, as the trainer's workers run:
    what the machine itself costs when every core computes (shared caches, memory bandwidth, the
    host), with no Ray, DeepSpeed or communication. Returns the first copy's (median wall s, CPU s)."""
    return _spawn(_bare_rank, (args,), world=copies)


def run_config(root: str, name: str, overrides: list[str]):
    """The measured run: DiP-T/16 on synthetic MDS shards, 2 workers x ZeRO-2 fp32, EMA on rank 0."""
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
    return config_from_dict(base, overrides)


def trainer_run(root: str, name: str, overrides: list[str]):
    from cluster.driver.launch import launch

    return launch(run_config(root, name, overrides), echo=lambda text: None)


def history(summary, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(tracking_uri=summary.tracking_uri).get_metric_history(summary.mlflow_run_id, key)
    return sorted((m.step, m.value) for m in points)


def trainer_step_time(root: str, name: str, overrides: list[str]) -> tuple[float, float]:
    """(median wall s, median CPU s of rank 0) per step of the full trainer, over its logging intervals
    after the first (which holds start-up and warm-up). No checkpoint falls inside them."""
    run = trainer_run(root, name, overrides)
    wall = [v for _, v in history(run, "step_time_s")[1:]]
    cpu = [v for _, v in history(run, "cpu_s_per_step")[1:]]
    return statistics.median(wall), statistics.median(cpu)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(target, args: tuple, world: int = 2):
    """Run target(rank, world, port, queue, *args) in `world` fresh processes at once; rank 0's queue item."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, queue, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    result = queue.get()
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"{target.__name__} rank exited with {proc.exitcode}")
    return result


def _init_gloo(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per rank, as a Ray worker with 1 CPU gets
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _no_ray_rank(rank: int, world: int, port: int, queue, cfg_dict: dict, root: str) -> None:
    import torch.distributed as dist

    from trainer.config import config_from_dict
    from trainer.loop.run import TrainingRun, WorkerContext

    class TimedRun(TrainingRun):
        """Keeps each logging interval's (wall s, CPU s) per step, which Ray runs read back from MLflow."""

        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.intervals: list[tuple[float, float]] = []

        def log_interval(self, meter, *args) -> None:
            figures = meter.figures(self.cfg.global_batch, None, None, self.world_size)
            self.intervals.append((figures["step_time_s"], figures["cpu_s_per_step"]))
            super().log_interval(meter, *args)

    _init_gloo(rank, world, port)
    ctx = WorkerContext(checkpoint_uri=os.path.join(root, "checkpoints"), run_dir=root, tracking_uri="",
                        mlflow_run_id="")
    run = TimedRun(config_from_dict(cfg_dict), ctx, rank, world)
    run.setup()
    run.run()
    if rank == 0:
        steady = run.intervals[1:]
        queue.put((statistics.median(w for w, _ in steady), statistics.median(c for _, c in steady)))
    dist.destroy_process_group()


def no_ray_step_time(root: str, name: str, overrides: list[str]) -> tuple[float, float]:
    """The trainer's own per-rank loop (trainer.loop.run.TrainingRun: the same DeepSpeed engine, streamed
    shards, EMA) on as many plain torch.distributed gloo processes, without Ray: splits the overhead into
    Ray's part and the rest. (median wall s, median CPU s of rank 0) per step, as trainer_step_time."""
    from data import prepare_dataset
    from trainer.config import to_dict

    cfg = run_config(root, name, overrides)
    cfg = cfg.replace(data=prepare_dataset(cfg.data, os.path.join(root, "data")))
    run_dir = os.path.join(root, "no-ray", name)
    os.makedirs(run_dir, exist_ok=True)
    return _spawn(_no_ray_rank, (to_dict(cfg), run_dir), world=cfg.cluster.num_workers)


def _comm_rank(rank: int, world: int, port: int, queue, numel: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    _init_gloo(rank, world, port)
    grads, shard = torch.randn(numel), torch.randn(numel // world)
    gathered = torch.empty(shard.numel() * world)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grads)                         # ZeRO-2 on gloo reduces the gradient bucket so
        dist.all_gather_into_tensor(gathered, shard)   # and gathers the updated fp32 partitions after the step
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(statistics.median(times[2:]))
    dist.destroy_process_group()


def communication_floor(num_params: int, world: int = 2) -> float:
    """Seconds per step of ZeRO-2's data-parallel traffic alone between `world` gloo processes on this machine:
    one all-reduce of the fp32 gradients and one all-gather of the fp32 parameters (no model)."""
    return _spawn(_comm_rank, (num_params, 12), world=world)


def _pct(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="trainer steps per run (logged every 10)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per worker")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of (trainer, trainer without Ray, bare loops), interleaved: this machine's "
                             "speed drifts between minutes, so each round's ratio is taken within the round")
    parser.add_argument("--workers", type=int, default=2,
                        help="Ray workers (1 CPU each, the rest of the machine's cores left to Ray itself); at 1 "
                             "there is no data-parallel traffic, so the figure is the trainer's machinery alone")
    parser.add_argument("--saves", type=int, default=4, help="checkpoints per sync/async run (0: skip)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import ray

    from models.registry import create_model

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    num_params = sum(p.numel() for p in create_model("DiP-T/16", num_classes=10).parameters())
    figures: dict = {"machine": f"{os.cpu_count()} CPU cores", "model": "DiP-T/16", "num_params": num_params,
                     "workers": args.workers, "batch_per_worker": args.batch, "resolution": args.resolution,
                     "steps": args.steps, "rounds": []}
    common = [f"data.batch_size={args.batch}", f"data.resolution={args.resolution}",
              f"cluster.num_workers={args.workers}"]
    bare_args = ("DiP-T/16", 10, args.batch, args.resolution, 30, 5)
    with tempfile.TemporaryDirectory(prefix="dip-bench-trainer-") as root:
        # 1. steady state, in interleaved rounds; no checkpoint inside the measured intervals
        for index in range(args.repeats):
            steady = common + [f"train.max_steps={args.steps}"]
            trainer_s, trainer_cpu = trainer_step_time(root, f"steady-{index}", steady)
            no_ray_s, _ = no_ray_step_time(root, f"steady-{index}", steady)
            bare_s, bare_cpu = bare_step_time(*bare_args)
            both_s = concurrent_bare_step_time(bare_args, args.workers)[0] if args.workers > 1 else bare_s
            comm_s = communication_floor(num_params, args.workers) if args.workers > 1 else 0.0
            round_ = {"trainer_s": trainer_s, "trainer_cpu_s": trainer_cpu, "no_ray_s": no_ray_s, "bare_s": bare_s,
                      "bare_cpu_s": bare_cpu, "bare_two_at_once_s": both_s, "comm_floor_s": comm_s}
            figures["rounds"].append(round_)
            print(f"round {index + 1}: trainer {trainer_s * 1e3:.0f} ms | without Ray {no_ray_s * 1e3:.0f} ms | "
                  f"bare loop {bare_s * 1e3:.0f} ms alone, {both_s * 1e3:.0f} ms two at once | ZeRO-2 traffic "
                  f"alone {comm_s * 1e3:.0f} ms -> overhead {_pct(trainer_s / bare_s)}", flush=True)

        def median_of(key: str, over: str | None = None) -> float:
            return statistics.median(r[key] / r[over] if over else r[key] for r in figures["rounds"])

        figures.update(
            trainer_step_s=median_of("trainer_s"), bare_step_s=median_of("bare_s"),
            overhead_wall=median_of("trainer_s", "bare_s") - 1,
            overhead_wall_vs_two_bare_at_once=median_of("trainer_s", "bare_two_at_once_s") - 1,
            overhead_cpu=median_of("trainer_cpu_s", "bare_cpu_s") - 1,
            share_ray=median_of("trainer_s", "no_ray_s") - 1,
            share_without_ray=median_of("no_ray_s", "bare_two_at_once_s") - 1,
            comm_floor_share=median_of("comm_floor_s", "bare_s"))
        print(f"\nmedians over {args.repeats} rounds (DiP-T/16, {args.resolution} px, micro-batch {args.batch} per "
              f"worker, {args.workers} worker(s), {num_params / 1e6:.1f}M parameters):")
        print(f"steady-state step, wall: trainer {figures['trainer_step_s'] * 1e3:.0f} ms vs bare loop "
              f"{figures['bare_step_s'] * 1e3:.0f} ms -> overhead {100 * figures['overhead_wall']:+.1f}% (target <= 10%)")
        print(f"  vs the bare loop as {args.workers} process(es) at once (one per core): "
              f"{100 * figures['overhead_wall_vs_two_bare_at_once']:+.1f}%")
        print(f"  split: the trainer without Ray vs the bare loops at once {100 * figures['share_without_ray']:+.1f}%; "
              f"Ray on top {100 * figures['share_ray']:+.1f}%")
        print(f"  ZeRO-2's gradient all-reduce + parameter all-gather alone (gloo, {args.workers} processes) = "
              f"{100 * figures['comm_floor_share']:.1f}% of a bare step: the floor of any data-parallel run of this size")
        print(f"steady-state step, CPU time of one process: overhead {100 * figures['overhead_cpu']:+.1f}%")
        # 2. checkpoint blocking: a save every 10 steps, written inline vs in the background
        for mode in ("sync", "async") if args.saves else ():
            steps = 10 * args.saves
            run = trainer_run(root, f"ckpt-{mode}", common + [f"train.max_steps={steps}", "checkpoint.every_steps=10",
                                                              f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"])
            blocked = [v for _, v in history(run, "checkpoint_blocking_s")]
            figures[f"checkpoint_blocking_{mode}_s"] = statistics.mean(blocked)
            figures[f"checkpoint_blocking_{mode}_all_s"] = [round(v, 4) for v in blocked]
            print(f"checkpoint save blocks the loop ({mode}): mean {statistics.mean(blocked) * 1000:.0f} ms over "
                  f"{len(blocked)} saves")
        if args.saves:
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
