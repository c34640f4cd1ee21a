"""The EMA update under ZeRO-3, before and after keeping it sharded: bytes moved and ms per step.

Before (trainer.loop.training_ema.gathered_update, the old trainer/worker.py path): every step, every rank
gathers the whole denoiser so that rank 0 can lerp a whole fp32 EMA (models.ema.EMA). After
(trainer.loop.training_ema.ShardedEMA.update): each rank lerps the fp32 EMA of its own partition.

Two gloo ranks (torch.multiprocessing, spawn, 1 torch thread each) build the trainer's own ZeRO-3
engine (trainer.loop.engine.build_engine) for MODEL, take one optimizer step so the weights differ from
the EMA, then time each path STEPS times (alternating, a barrier before each call; the figure is the
slower rank's median). Bytes: every torch.distributed collective the path calls is counted (the
tensors' sizes), as what one rank receives. Also timed: gathering the sharded EMA for ema.pt (what
a checkpoint save or a sample grid now costs, instead of every step). Then the same arithmetic on
paper for DiP-XL/16 on 8 GPUs in bf16 (no run).

    python benchmarks/ema.py [--model DiP-B/16] [--precision fp32 bf16] [--steps 10]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
WORLD = 2
# every collective a ZeRO-3 gather or our gather/scatter can reach, at the torch.distributed level
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced", "gather",
               "scatter", "broadcast", "all_reduce", "reduce_scatter_tensor", "_reduce_scatter_base")


class ByteCounter:
    """Counts the bytes this rank receives through torch.distributed collectives while active."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.active = False

    def received(self, name: str, args: tuple, kwargs: dict) -> int:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        params = dict(zip(("a", "b"), args)) | kwargs

        def nbytes(tensor):
            return tensor.numel() * tensor.element_size()
        if name in ("all_gather_into_tensor", "_all_gather_base"):
            out = params.get("output_tensor", params.get("a"))
            return nbytes(out) * (world - 1) // world
        if name in ("all_gather", "all_gather_coalesced"):
            outs = params.get("tensor_list", params.get("output_tensor_lists", params.get("a")))
            flat = [t for item in outs for t in (item if isinstance(item, list) else [item])]
            return sum(nbytes(t) for t in flat) * (world - 1) // world
        if name == "gather":
            tensor = params.get("tensor", params.get("a"))
            return nbytes(tensor) * (world - 1) if rank == params.get("dst", 0) else 0
        if name == "scatter":
            tensor = params.get("tensor", params.get("a"))
            return 0 if rank == params.get("src", 0) else nbytes(tensor)
        tensor = params.get("tensor", params.get("a"))  # broadcast, all-reduce, reduce-scatter: one buffer's worth
        return nbytes(tensor) if tensor is not None else 0

    def install(self) -> None:
        import torch.distributed as dist

        def wrap(name, fn):
            def counted(*args, **kwargs):
                if self.active:
                    self.calls += 1
                    self.bytes += self.received(name, args, kwargs)
                return fn(*args, **kwargs)
            return counted
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, wrap(name, getattr(dist, name)))
        # DeepSpeed's comm backend binds its all-gather function once, at start-up
        from deepspeed.comm import comm as ds_comm

        backend = ds_comm.cdb
        if backend is not None and getattr(backend, "all_gather_function", None) is not None:
            backend.all_gather_function = wrap("all_gather_into_tensor", backend.all_gather_function)

    @contextlib.contextmanager
    def counting(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


def _timed(fn, counter: ByteCounter) -> tuple[float, float, int]:
    """(wall s, CPU s of this process, bytes received) of one call."""
    import torch.distributed as dist

    dist.barrier()
    before = counter.bytes
    with counter.counting():
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, counter.bytes - before


def _rank(rank: int, port: int, model: str, precision: str, steps: int, queue) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    from models.ema import EMA
    from trainer.config import config_from_dict
    from trainer.loop.engine import build_engine, build_objective_module
    from trainer.loop.training_ema import ShardedEMA, gathered_update

    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed calls torch's renamed collectives
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = config_from_dict({"model": {"name": model, "num_classes": 10},
                            "data": {"resolution": 32, "batch_size": 1, "synthetic_classes": 10},
                            "train": {"zero_stage": 3, "precision": precision}, "cluster": {"num_workers": WORLD}})
    module = build_objective_module(cfg)
    before = EMA(module.denoiser, cfg.optim.ema_decay) if rank == 0 else None   # the old rank-0 EMA
    after = ShardedEMA(module.denoiser, cfg.optim.ema_decay, rank, WORLD)
    engine = build_engine(cfg, module, cfg.batch_split(WORLD))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loss, _ = engine(torch.randn(1, 3, 32, 32).to(dtype), torch.zeros(1, dtype=torch.long))
    engine.backward(loss)
    engine.step()
    counter = ByteCounter()
    counter.install()
    denoiser = engine.module.denoiser
    paths = {"before": lambda: gathered_update(before, denoiser), "after": lambda: after.update(denoiser)}
    for fn in paths.values():  # warm-up: first-call allocations
        fn()
    figures = {name: {"ms": [], "cpu_ms": [], "bytes": []} for name in paths}
    for _ in range(steps):
        for name, fn in paths.items():
            wall, cpu, moved = _timed(fn, counter)
            figures[name]["ms"].append(1e3 * wall)
            figures[name]["cpu_ms"].append(1e3 * cpu)
            figures[name]["bytes"].append(moved)
    save_s, _, save_bytes = _timed(after.full_state_dict, counter)
    result = {name: {"ms": statistics.median(f["ms"]), "cpu_ms": statistics.median(f["cpu_ms"]),
                     "bytes": max(f["bytes"])} for name, f in figures.items()}
    result["save_gather"] = {"ms": 1e3 * save_s, "bytes": save_bytes}
    result["params"] = sum(p.ds_numel for p in denoiser.parameters())
    result["ema_bytes"] = {"before": sum(t.numel() * 4 for t in before.module.parameters()) if before else 0,
                           "after": sum(t.numel() * 4 for t in after.shards.values())}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, result)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def measure(model: str, precision: str, steps: int) -> None:
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(_free_port(), model, precision, steps, queue), nprocs=WORLD,
                       start_method="spawn")
    ranks = queue.get()
    params = ranks[0]["params"]
    print(f"\n{model} ({params:,} parameters), ZeRO-3 {precision}, {WORLD} gloo ranks, median of {steps} calls; "
          f"ms: the slower rank (wall; CPU of its process); bytes: what one rank receives")
    print("path | bytes per step (rank 0 / rank 1) | ms per step, wall | CPU ms | EMA memory (rank 0 / rank 1)")
    for name in ("before", "after"):
        ms, cpu = max(r[name]["ms"] for r in ranks), max(r[name]["cpu_ms"] for r in ranks)
        memory = " / ".join(_mb(r["ema_bytes"][name]) for r in ranks)
        print(f"{name} | {' / '.join(_mb(r[name]['bytes']) for r in ranks)} | {ms:.1f} | {cpu:.1f} | {memory}")
    before = max(r["before"]["ms"] for r in ranks)
    after = max(r["after"]["ms"] for r in ranks)
    print(f"after vs before: {before / after:.1f}x faster per step; rank 0's EMA memory "
          f"{ranks[0]['ema_bytes']['before'] / ranks[0]['ema_bytes']['after']:.1f}x smaller")
    save = ranks[0]["save_gather"]
    print(f"after, once per checkpoint or sample grid: gathering the EMA to rank 0 moves {_mb(save['bytes'])} "
          f"to rank 0 in {max(r['save_gather']['ms'] for r in ranks):.1f} ms")


def on_paper(gpus: int = 8) -> None:
    """DiP-XL/16 (the paper's config) on `gpus` GPUs in bf16: the same accounting, arithmetic only."""
    from cluster.planning.memory import count_parameters
    from trainer.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, params, _, _ = count_parameters(load_config(os.path.join(root, "configs", "dip_xl16_256.yaml")))
    per_rank_gather = 2 * params * (gpus - 1) / gpus   # bf16 weights, all-gathered every step
    print(f"\nDiP-XL/16 ({params:,} parameters), ZeRO-3 bf16, {gpus} GPUs, on paper:")
    print(f"before: every step each rank receives {per_rank_gather / 1e9:.2f} GB (the whole bf16 denoiser, "
          f"{2 * params / 1e9:.2f} GB, less its own 1/{gpus}); rank 0 keeps {4 * params / 2 ** 30:.2f} GiB of fp32 EMA")
    print(f"after: 0 bytes per step; every rank keeps {4 * params / gpus / 2 ** 30:.2f} GiB of fp32 EMA; "
          f"a checkpoint or grid gathers {4 * params * (gpus - 1) / gpus / 1e9:.2f} GB of fp32 EMA to rank 0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiP-B/16")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for precision in args.precision:
        measure(args.model, precision, args.steps)
    on_paper()
    return 0


if __name__ == "__main__":
    sys.exit(main())
