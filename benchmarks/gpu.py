"""GPU benchmark (issue 7): training images/s + MFU, the head's cost, sampling seconds/image, memory.

On whatever device it finds it prints
  (a) training images/s and MFU for DiP-XL/16 at 256 with the trainer's own objective module,
      DeepSpeed config and engine (one device, ZeRO-2, bf16; no Ray), EMA update included;
  (b) the same for the linear-head ablation, and the head's share of step time;
  (c) sampling seconds/image at 100 Euler steps with CFG at batch 1, 64 and 256;
  (d) peak memory of each part,
then writes a JSON and prints a line for benchmarks/RESULTS.md (device, date, torch, command).

    python benchmarks/gpu.py                     # the full run (meant for one H100)
    python benchmarks/gpu.py --smoke             # DiP-T/16 at 32, a few steps: checks the script anywhere
    python benchmarks/gpu.py --compile           # torch.compile the denoiser (eager fallback if it fails)
    python benchmarks/gpu.py --engine torch      # no DeepSpeed installed: plain AdamW + bf16 autocast (labelled)

The training step is the trainer's: engine(pixels, labels, keyed draws) -> backward -> step, then the
EMA update (trainer/loop/step.py OptimizerStep), fed from device-resident random batches so
that only the model step is timed (the data pipeline has its own benchmark).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import re
import socket
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import

from models.flops import dip_flops  # noqa: E402
from models.registry import create_model, dip_config  # noqa: E402
from models.speed import compile_state, maybe_compile, time_sampling  # noqa: E402
from trainer.tracking.mfu import device_name, mfu_report, peak_for_device_name  # noqa: E402
from trainer.loop.rng import keyed_draws  # noqa: E402

BASE_CONFIG = os.path.join(REPO, "configs", "dip_xl16_256.yaml")
PAPER_CFG_SCALE, PAPER_CFG_INTERVAL = 2.9, (0.11, 0.97)
ENGINES = ("deepspeed", "torch")


# ----------------------------------------------------------------------------------------------
#                                          helpers
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset; None on CPU (process RSS is not per part)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def init_single_process_group(device: torch.device) -> None:
    """A world of one (what Ray Train would set up): the trainer's engine builder expects a group."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


# ----------------------------------------------------------------------------------------------
#                                   (a), (b): training
# ----------------------------------------------------------------------------------------------

def train_config(model_name: str, resolution: int, batch: int, precision: str):
    from trainer.config import load_config

    return load_config(BASE_CONFIG, [f"model.name={model_name}", f"data.resolution={resolution}",
                                     f"data.batch_size={batch}", "data.path=synthetic", "train.zero_stage=2",
                                     f"train.precision={precision}", "train.grad_accum=1"])


class TorchEngine:
    """Stand-in when DeepSpeed is absent: the same objective module, torch AdamW, bf16 autocast.

    Not the trainer's engine: results from it are labelled engine=torch.
    """

    def __init__(self, module, cfg, device: torch.device):
        from trainer.loop.engine import build_optimizer

        self.module = module.to(device)
        self.optimizer, _ = build_optimizer(module, cfg)
        self.device = device
        self.precision = cfg.train.precision

    def __call__(self, *args):
        from models.speed import mixed_precision

        with mixed_precision(self.device, self.precision, allow_cpu=True):
            return self.module(*args)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_training(cfg, device: torch.device, engine_kind: str, compile_model: bool, compile_kwargs: dict):
    from models.ema import EMA
    from trainer.loop.engine import build_engine, build_objective_module

    module = build_objective_module(cfg)
    maybe_compile(module.denoiser, compile_model, **compile_kwargs)
    ema = EMA(module.denoiser, cfg.optim.ema_decay)   # as the worker: from the initial weights
    if engine_kind == "deepspeed":
        init_single_process_group(device)
        engine = build_engine(cfg, module, cfg.batch_split(1))
    else:
        engine = TorchEngine(module, cfg, device)
    ema.module.to(device)
    return engine, ema


def time_training(model_name: str, args, device: torch.device) -> dict:
    """Images/s of the trainer's step at a micro-batch; halves the batch on out-of-memory."""
    batch = args.train_batch
    while True:
        reset_peak_memory(device)
        try:
            return _time_training_at(model_name, batch, args, device)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err) or batch == 1:
                raise
            print(f"  out of memory at micro-batch {batch}: retrying at {batch // 2}", flush=True)
            batch //= 2


def _time_training_at(model_name: str, batch: int, args, device: torch.device) -> dict:
    cfg = train_config(model_name, args.resolution, batch, args.precision)
    input_dtype = torch.bfloat16 if args.precision == "bf16" and args.engine == "deepspeed" else torch.float32
    keys = [f"sample-{i}" for i in range(batch)]  # the trainer keys each sample's t / noise / dropout draws
    g = torch.Generator().manual_seed(1)
    # a few distinct batches, resident on the device: only the step is timed
    batches = [(torch.rand(batch, 3, args.resolution, args.resolution, generator=g).mul(2).sub(1)
                .to(device, input_dtype),
                torch.randint(0, cfg.model.num_classes, (batch,), generator=g).to(device)) for _ in range(2)]
    engine, ema = build_training(cfg, device, args.engine, args.compile, args.compile_kwargs)
    denoiser = engine.module.denoiser

    def step(i: int) -> torch.Tensor:
        pixels, labels = batches[i % len(batches)]
        loss, _parts = engine(pixels, labels, keyed_draws(0, i, keys, tuple(pixels.shape[1:]), device))
        engine.backward(loss)
        engine.step()
        if not args.no_ema:
            ema.update(denoiser)
        return loss

    try:
        for i in range(args.warmup_steps):
            step(i)
        synchronize(device)
        start = time.perf_counter()
        for i in range(args.train_steps):
            loss = step(i)
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.train_steps
        if not torch.isfinite(loss.float()):
            raise RuntimeError(f"{model_name}: the training loss is not finite ({loss.item()})")
        flops = dip_flops(dip_config(model_name), args.resolution)
        images_per_s = batch / seconds
        report = mfu_report(flops.training, images_per_s, device)
        return {"model": model_name, "engine": args.engine, "micro_batch": batch, "step_s": seconds,
                "images_per_s": images_per_s, "training_gflops_per_image": flops.training / 1e9,
                "head_flop_share": flops.head_share, "peak_memory_gib": peak_memory_gib(device),
                "compile": compile_state(denoiser), "ema": not args.no_ema, **report}
    finally:
        del engine, ema, batches, denoiser  # free this model before the next part starts
        reset_peak_memory(device)


# ----------------------------------------------------------------------------------------------
#                                     (c): sampling
# ----------------------------------------------------------------------------------------------

def guided_evaluations(steps: int, interval: tuple[float, float]) -> int:
    """Network image-evaluations per sampled image with Euler + CFG (doubled inside the interval)."""
    from models.sampling import time_grid

    lo, hi = interval
    return sum(2 if lo < t < hi else 1 for t in time_grid(steps)[:-1].tolist())


def time_sampling_batches(args, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(args.model).to(device).eval()
    maybe_compile(model, args.compile, **args.compile_kwargs)
    forward_flops = dip_flops(dip_config(args.model), args.resolution).forward
    evaluations = guided_evaluations(args.sample_steps, args.cfg_interval)
    peak = peak_for_device_name(device_name(device)) if device.type == "cuda" else None
    practical = (peak.measured_matmul_tflops or peak.bf16_dense_tflops) if peak is not None else None
    rows = []
    for batch in args.sample_batches:
        reset_peak_memory(device)
        try:
            row = time_sampling(model, batch, args.sample_steps, args.cfg_scale, device, resolution=args.resolution,
                                cfg_interval=args.cfg_interval, precision=args.precision)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            print(f"  sampling batch {batch}: out of memory", flush=True)
            rows.append({"batch": batch, "error": "out of memory"})
            continue
        row["network_evaluations_per_image"] = evaluations
        row["peak_memory_gib"] = peak_memory_gib(device)
        # the FLOP floor: every evaluation at the practical matmul peak (None where no peak is known)
        row["flop_floor_s_per_image"] = (forward_flops * evaluations / (practical * 1e12)) if practical else None
        rows.append(row)
    del model
    reset_peak_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------
#                                         main
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="DiP-T/16 at 32, tiny batches and step counts: checks the script on any machine")
    parser.add_argument("--model", default=None, help="default DiP-XL/16 (DiP-T/16 with --smoke)")
    parser.add_argument("--resolution", type=int, default=None, help="default 256 (32 with --smoke)")
    parser.add_argument("--engine", choices=ENGINES, default="deepspeed")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--train-batch", type=int, default=None, help="micro-batch; default 64 (2 with --smoke)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default 5 (1 with --smoke)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps; default 20 (2 with --smoke)")
    parser.add_argument("--no-ema", action="store_true", help="leave the EMA update out of the step")
    parser.add_argument("--sample-batches", default=None, help="comma list; default 1,64,256 (1,2 with --smoke)")
    parser.add_argument("--sample-steps", type=int, default=None, help="Euler steps; default 100 (4 with --smoke)")
    parser.add_argument("--cfg-scale", type=float, default=PAPER_CFG_SCALE)
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=PAPER_CFG_INTERVAL, metavar=("LO", "HI"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser (eager fallback)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: train, linear, sample")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON; default benchmarks/results/gpu_<device>_<date>.json "
                             "(none with --smoke)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.model = args.model or ("DiP-T/16" if smoke else "DiP-XL/16")
    args.resolution = args.resolution or (32 if smoke else 256)
    args.train_batch = args.train_batch or (2 if smoke else 64)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if smoke else 5)
    args.train_steps = args.train_steps or (2 if smoke else 20)
    args.sample_steps = args.sample_steps or (4 if smoke else 100)
    try:
        args.sample_batches = [int(b) for b in (args.sample_batches or ("1,2" if smoke else "1,64,256")).split(",")]
    except ValueError:
        parser.error(f"--sample-batches={args.sample_batches!r}: expected a comma list of integers, e.g. 1,64,256")
    args.skip = {part for part in args.skip.split(",") if part}
    unknown = args.skip - {"train", "linear", "sample"}
    if unknown:
        parser.error(f"--skip: unknown part(s) {sorted(unknown)}; valid: train, linear, sample")
    if min(args.train_batch, args.train_steps, args.sample_steps, *args.sample_batches) < 1 or args.warmup_steps < 0:
        parser.error("batches and step counts must be >= 1 (--warmup-steps >= 0)")
    if args.model.endswith("-linear"):
        parser.error(f"--model={args.model!r}: give the detailer size; its -linear ablation is run as part (b)")
    dip_config(args.model)  # an unknown size fails here, listing the valid ones
    args.cfg_interval = tuple(args.cfg_interval)
    args.compile_kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
    return args


def print_training(row: dict) -> None:
    mfu = "n/a (no known peak for this device)" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    practical = "" if row["mfu_practical"] is None else \
        f", {100 * row['mfu_practical']:.1f}% of the measured {row['practical_peak_tflops']:.0f} TFLOP/s matmul peak"
    memory = "" if row["peak_memory_gib"] is None else f", peak memory {row['peak_memory_gib']:.1f} GiB"
    print(f"  {row['model']:18} micro-batch {row['micro_batch']:4d}: {row['images_per_s']:9.2f} img/s, "
          f"{row['step_s'] * 1e3:8.1f} ms/step, {row['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}{practical}{memory} "
          f"[engine {row['engine']}, compile {row['compile']}]", flush=True)


def print_sampling(row: dict) -> None:
    if "error" in row:
        print(f"  batch {row['batch']:4d}: {row['error']}")
        return
    floor = "" if row["flop_floor_s_per_image"] is None else \
        f" (FLOP floor {row['flop_floor_s_per_image']:.4f} s/img)"
    memory = "" if row["peak_memory_gib"] is None else f", peak memory {row['peak_memory_gib']:.1f} GiB"
    print(f"  batch {row['batch']:4d}: {row['seconds_per_image']:.4f} s/img{floor}, {row['images_per_s']:.2f} img/s, "
          f"{row['network_evaluations_per_image']} network evaluations per image{memory} [compile {row['compile']}]",
          flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    name = device_name(device)
    command = "python benchmarks/gpu.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    print(f"device: {name} | torch {torch.__version__} | {args.precision} | engine {args.engine} | "
          f"compile {args.compile}", flush=True)
    if device.type != "cuda" and not args.smoke:
        print("  no CUDA device: this runs the full GPU sizes on the CPU (very slow); --smoke checks the script")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 leftovers (EMA, loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True          # the head's convs: pick the fastest algorithm

    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name,
              "torch": torch.__version__, "command": command, "engine": args.engine, "precision": args.precision,
              "compile": args.compile, "compile_mode": args.compile_mode, "resolution": args.resolution,
              "training": [], "sampling": []}
    if "train" not in args.skip:
        print(f"(a, b) training, {args.warmup_steps} warm-up + {args.train_steps} timed steps, ZeRO-2, "
              f"{args.precision}:", flush=True)
        models = [args.model] + ([] if "linear" in args.skip else [f"{args.model}-linear"])
        for model_name in models:
            row = time_training(model_name, args, device)
            result["training"].append(row)
            print_training(row)
        if len(result["training"]) == 2:
            detailer, linear = result["training"]
            # per image, so a different micro-batch after an out-of-memory retry still compares
            share = 1 - detailer["images_per_s"] / linear["images_per_s"]
            result["head_step_time_share"] = share
            print(f"  head's share of step time: {100 * share:.1f}% (1 - detailer img/s / linear img/s); "
                  f"of FLOPs: {100 * detailer['head_flop_share']:.1f}%", flush=True)
    if "sample" not in args.skip:
        print(f"(c) sampling {args.model}, {args.sample_steps} Euler steps, CFG {args.cfg_scale} on "
              f"{args.cfg_interval}, {args.precision}:", flush=True)
        result["sampling"] = time_sampling_batches(args, device)
        for row in result["sampling"]:
            print_sampling(row)

    json_path = args.json if args.json is not None else (
        "" if args.smoke else os.path.join(REPO, "benchmarks", "results",
                                           f"gpu_{slug(name)}_{datetime.date.today().isoformat()}.json"))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_path}")
    print("RESULTS.md line: " + results_line(result), flush=True)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def results_line(result: dict) -> str:
    parts = []
    for row in result["training"]:
        mfu = "MFU n/a" if row["mfu"] is None else f"MFU {100 * row['mfu']:.1f}%"
        parts.append(f"{row['model']} train {row['images_per_s']:.1f} img/s ({mfu}, mb {row['micro_batch']})")
    if "head_step_time_share" in result:
        parts.append(f"head {100 * result['head_step_time_share']:.1f}% of step time")
    for row in result["sampling"]:
        if "error" not in row:
            parts.append(f"sample b{row['batch']} {row['seconds_per_image']:.4f} s/img")
    return (f"| {result['date'][:10]} | {result['device']} | torch {result['torch']} | `{result['command']}` | "
            + "; ".join(parts) + " |")


if __name__ == "__main__":
    sys.exit(main())
