"""What a resize costs: loading a ZeRO checkpoint on another world size (trainer.checkpoint.repartition).

For one model size and ZeRO stage: W_save gloo ranks build the trainer's engine (trainer.loop.engine,
fp32 on CPU), take one optimizer step (so AdamW's moments exist), and snapshot the checkpoint as the
trainer writes it. Then W_load ranks load it: DeepSpeed's own loader when W_load == W_save, the
re-partitioning loader (trainer.checkpoint.repartition.load_resharded) otherwise. Prints seconds, bytes on disk,
and the throughput, and puts DiP-XL/16 on paper at that throughput.

    python benchmarks/elastic.py                                  # DiP-B/16, ZeRO 1/2/3, 2 -> 1 and 2 -> 2
    python benchmarks/elastic.py --model DiP-T/16 --stages 2      # the tests' tiny model
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
XL16_PARAMS = 630_848_931  # `dip plan configs/dip_xl16_256.yaml`


def _config(model: str, stage: int):
    from trainer.config import config_from_dict

    return config_from_dict({"model": {"name": model, "num_classes": 10},
                             "data": {"resolution": 32, "batch_size": 1, "path": "synthetic"},
                             "train": {"zero_stage": stage, "precision": "fp32"},
                             "cluster": {"num_workers": 2}})


def _rank(rank: int, world: int, port: int, job: dict, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from trainer.checkpoint.deepspeed_io import load_engine, snapshot_engine
    from trainer.loop.engine import build_engine, build_objective_module
    from trainer.loop.rng import keyed_draws
    from trainer.checkpoint.repartition import load_resharded

    cfg = _config(job["model"], job["stage"])
    engine = build_engine(cfg, build_objective_module(cfg), cfg.batch_split(world))
    result = {}
    if job["kind"] == "save":
        pixels = torch.zeros(1, 3, 32, 32)
        loss, _ = engine(pixels, torch.zeros(1, dtype=torch.long), keyed_draws(0, 0, [f"{rank}"], (3, 32, 32), "cpu"))
        engine.backward(loss)
        engine.step()
        staging = tempfile.mkdtemp(dir=job["dir"])
        for rel, state in snapshot_engine(engine, 1, staging):
            path = os.path.join(job["dir"], "step-1", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(state, path)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        dist.barrier()
        start = time.perf_counter()
        if job["resharded"]:
            load_resharded(engine, os.path.join(job["dir"], "step-1"))
        else:
            load_engine(engine, os.path.join(job["dir"], "step-1"))
        result["load_s"] = time.perf_counter() - start
    dist.barrier()
    dist.destroy_process_group()
    out.put((rank, result))


def _run(world: int, job: dict) -> list[dict]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")  # a clean interpreter per rank (no forked OpenMP state)
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, job, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"rank process exited with {p.exitcode}")
    return [results[r] for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiP-B/16")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--save-world", type=int, default=2)
    parser.add_argument("--load-worlds", default="1,2")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()
    from cluster.planning.memory import count_parameters

    params = count_parameters(_config(args.model, 2))[0]
    rows = []
    for stage in [int(s) for s in args.stages.split(",")]:
        root = tempfile.mkdtemp(prefix="dip-elastic-bench-")
        try:
            _run(args.save_world, {"kind": "save", "model": args.model, "stage": stage, "dir": root})
            step_dir = os.path.join(root, "step-1")
            size = sum(os.path.getsize(os.path.join(step_dir, f)) for f in os.listdir(step_dir))
            for world in [int(w) for w in args.load_worlds.split(",")]:
                resharded = world != args.save_world
                loads = _run(world, {"kind": "load", "model": args.model, "stage": stage, "dir": root,
                                     "resharded": resharded})
                seconds = max(r["load_s"] for r in loads)
                rows.append({"model": args.model, "params": params, "stage": stage, "save_world": args.save_world,
                             "load_world": world, "loader": "zero_state (re-partition)" if resharded else "DeepSpeed",
                             "checkpoint_bytes": size, "load_s": round(seconds, 3),
                             "gb_per_s": round(size / seconds / 1e9, 3)})
                print(f"ZeRO-{stage} {args.model} ({params / 1e6:.0f}M params, {size / 2 ** 30:.2f} GiB on disk): "
                      f"{args.save_world} -> {world} ranks with {rows[-1]['loader']}: {seconds:.2f} s "
                      f"({rows[-1]['gb_per_s']:.2f} GB/s of checkpoint)", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    for row in rows:
        if row["load_world"] != row["save_world"]:
            scale = XL16_PARAMS / row["params"]
            print(f"on paper, DiP-XL/16 ({XL16_PARAMS / 1e6:.0f}M params) ZeRO-{row['stage']} "
                  f"{row['save_world']} -> {row['load_world']}: ~{row['load_s'] * scale:.0f} s at this machine's rate "
                  f"(checkpoint {row['checkpoint_bytes'] * scale / 2 ** 30:.1f} GiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
