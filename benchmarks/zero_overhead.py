"""DeepSpeed alone, without Ray: where the trainer's step overhead comes from.

The quickstart model (DiP-T/16, 32 px, micro-batch 8 per rank, batch in memory, fp32, 1 torch thread
per rank) stepped by DeepSpeed engines on gloo, started with torch.multiprocessing: 1 rank at
ZeRO-0, then 2 ranks at ZeRO-0, 1 and 2. Prints the median forward / backward / step times of rank 0
over 40 steps (after 5 warm-up steps). Compare with `benchmarks/trainer.py` (the same model in the
full Ray Train trainer) to split the overhead into DeepSpeed + gloo and everything around it.

    python benchmarks/zero_overhead.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart_cpu.yaml")
STEPS, WARMUP = 40, 5


def _rank(rank: int, world: int, stage: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from data.records import to_pm1
    from data.synthetic import reference_images
    from trainer.loop.rng import keyed_draws
    from trainer.config import load_config
    from trainer.loop.engine import build_engine, build_objective_module

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(QUICKSTART, ["data.batch_size=8", f"train.zero_stage={stage}"])
    module = build_objective_module(cfg)
    images, labels = reference_images(8, 32, 10, seed=rank)
    images = to_pm1(images)
    engine = build_engine(cfg, module, cfg.batch_split(world))
    keys = [f"{rank}-{i}" for i in range(len(labels))]
    times = {"forward": [], "backward": [], "step": []}
    for index in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        loss, _ = engine(images, labels, keyed_draws(0, index, keys, tuple(images.shape[1:]), "cpu"))
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if index >= WARMUP:
            times["forward"].append(t1 - t0)
            times["backward"].append(t2 - t1)
            times["step"].append(t3 - t2)
    if rank == 0:
        queue.put({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()


def main() -> int:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    rows = []
    for index, (world, stage) in enumerate(((1, 0), (2, 0), (2, 1), (2, 2))):
        queue = ctx.SimpleQueue()
        mp.start_processes(_rank, args=(world, stage, 29760 + index, queue), nprocs=world, start_method="spawn")
        rows.append((world, stage, queue.get()))
    base = sum(rows[0][2].values())
    print("ranks | ZeRO | forward ms | backward ms | step ms | total ms | vs 1 rank")
    for world, stage, t in rows:
        total = sum(t.values())
        print(f"{world} | {stage} | {t['forward'] * 1e3:.0f} | {t['backward'] * 1e3:.0f} | {t['step'] * 1e3:.0f} | "
              f"{total * 1e3:.0f} | {100 * (total / base - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
