"""Model benchmark: forward and forward+backward images/s and FLOPs per image, detailer vs linear head.

For DiP-XL/16 at 256 and DiP-XL/32 at 512 (issue 3): FLOPs from torch.utils.flop_counter
(models/flops.py), the head's share of FLOPs and of time (time share = what removing the head
saves: (detailer - linear) / detailer), and the head alone in contiguous vs channels-last layout.
Runs unchanged on a GPU (bf16 autocast there, fp32 on CPU).

    python benchmarks/model.py --quick          # CPU: XL/16 only, batch 1, one timed pass (minutes)
    python benchmarks/model.py                  # all four models, batch 2 on CPU / 32 on GPU
    python benchmarks/model.py --json out.json  # also write the figures

CPU timings on a shared 2-core machine are noisy: the load average is printed with the figures.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from models.flops import dip_flops  # noqa: E402
from models.registry import create_model, dip_config  # noqa: E402
from models.speed import maybe_compile, mixed_precision, set_head_channels_last  # noqa: E402

# (model name, resolution): the two sizes issue 3 asks for; each also runs with the linear head.
CASES = (("DiP-XL/16", 256), ("DiP-XL/32", 512))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, after `warmup` untimed calls.

    On a shared CPU machine the wall clock counts time spent descheduled; the process CPU time
    with --threads 1 does not, so it is the steadier figure for ratios (head share, layouts).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def build(name: str, device: torch.device, compile_model: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name).to(device)
    return maybe_compile(model, compile_model)


def inputs(model, batch: int, resolution: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, model.config.num_classes, (batch,), generator=g).to(device)
    return x, t, y


def time_model(model, batch: int, resolution: int, device: torch.device, precision: str, warmup: int,
               iters: int, backward: bool = True) -> dict[str, float]:
    """Seconds per forward (no grad) and per forward+backward (loss on v) at one batch size."""
    x, t, y = inputs(model, batch, resolution, device)

    @torch.no_grad()
    def forward():
        with mixed_precision(device, precision):
            model(x, t, y)

    def forward_backward():
        with mixed_precision(device, precision):
            loss = model(x, t, y).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    out = dict(zip(("forward_s", "forward_cpu_s"), timed(forward, device, warmup, iters)))
    if backward:
        # the forward warm-up above already primed kernels and the allocator for the forward half
        out.update(zip(("forward_backward_s", "forward_backward_cpu_s"),
                       timed(forward_backward, device, max(warmup - 1, 0), iters)))
    return out


def time_head_layouts(model, batch: int, resolution: int, device: torch.device, precision: str, warmup: int,
                      iters: int) -> dict[str, float]:
    """The detailer head alone (all B*T patches), contiguous vs channels-last, forward+backward."""
    x, t, y = inputs(model, batch, resolution, device)
    P, D = model.config.patch_size, model.config.hidden_size
    tokens = (resolution // P) ** 2
    patches = torch.randn(batch * tokens, 3, P, P, device=device)          # (B*T, C, P, P)
    context = torch.randn(batch * tokens, D, P // 16, P // 16, device=device)
    out = {}
    for layout in ("contiguous", "channels_last"):
        set_head_channels_last(model, layout == "channels_last")

        def head_step():
            with mixed_precision(device, precision):
                # through the hook path: the pre-hook sits on local_decoder itself
                v = model.local_decoder(patches, context)
            v.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        out.update(zip((f"head_{layout}_s", f"head_{layout}_cpu_s"), timed(head_step, device, warmup, iters)))
    set_head_channels_last(model, False)
    return out


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run_case(name: str, resolution: int, args, device: torch.device) -> dict:
    row = {"model": name, "resolution": resolution, "batch": args.batch}
    flops = {head: dip_flops(dip_config(f"{name}{suffix}"), resolution)
             for head, suffix in (("detailer", ""), ("linear", "-linear"))}
    for head, suffix in (("detailer", ""), ("linear", "-linear")):
        model = build(f"{name}{suffix}", device, args.compile)
        times = time_model(model, args.batch, resolution, device, args.precision, args.warmup, args.iters)
        count = flops[head]
        row[head] = {
            "forward_gflops": count.forward / 1e9, "training_gflops": count.training / 1e9,
            "head_flop_share": count.head_share,
            "forward_images_per_s": args.batch / times["forward_s"],
            "forward_backward_images_per_s": args.batch / times["forward_backward_s"],
            "achieved_forward_tflops": count.forward * args.batch / times["forward_s"] / 1e12,
            "achieved_training_tflops": count.training * args.batch / times["forward_backward_s"] / 1e12,
            **times,
        }
        if head == "detailer" and args.head_layouts:
            row[head].update(time_head_layouts(model, args.batch, resolution, device, args.precision,
                                               args.warmup, args.iters))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    det, lin = row["detailer"], row["linear"]
    for clock in ("", "_cpu"):
        for part, key in (("forward", "forward"), ("training", "forward_backward")):
            detailer_s, linear_s = det[f"{key}{clock}_s"], lin[f"{key}{clock}_s"]
            row[f"head_time_share_{part}{clock}"] = (detailer_s - linear_s) / detailer_s
    return row


def print_row(row: dict) -> None:
    print(f"\n{row['model']} at {row['resolution']}px, batch {row['batch']}")
    print(f"  {'head':9} {'fwd GFLOP':>10} {'train GFLOP':>12} {'fwd img/s':>10} {'fwd+bwd img/s':>14} "
          f"{'fwd TFLOP/s':>12} {'train TFLOP/s':>14}")
    for head in ("detailer", "linear"):
        r = row[head]
        print(f"  {head:9} {r['forward_gflops']:10.1f} {r['training_gflops']:12.1f} {r['forward_images_per_s']:10.3f} "
              f"{r['forward_backward_images_per_s']:14.3f} {r['achieved_forward_tflops']:12.4f} "
              f"{r['achieved_training_tflops']:14.4f}")
    det = row["detailer"]
    print(f"  head share: {100 * det['head_flop_share']:.1f}% of FLOPs; {100 * row['head_time_share_forward']:.1f}% of "
          f"forward time, {100 * row['head_time_share_training']:.1f}% of forward+backward time "
          "((detailer - linear) / detailer)")
    print(f"  by process CPU time: {100 * row['head_time_share_forward_cpu']:.1f}% of forward, "
          f"{100 * row['head_time_share_training_cpu']:.1f}% of forward+backward; CPU s/image fwd "
          f"{det['forward_cpu_s'] / row['batch']:.2f} / {row['linear']['forward_cpu_s'] / row['batch']:.2f}, "
          f"fwd+bwd {det['forward_backward_cpu_s'] / row['batch']:.2f} / "
          f"{row['linear']['forward_backward_cpu_s'] / row['batch']:.2f} (detailer / linear)")
    if "head_channels_last_s" in det:
        ratio = det["head_contiguous_s"] / det["head_channels_last_s"]
        print(f"  head alone fwd+bwd: contiguous {det['head_contiguous_s']:.3f} s, channels-last "
              f"{det['head_channels_last_s']:.3f} s (channels-last speed-up x{ratio:.2f}); CPU time "
              f"x{det['head_contiguous_cpu_s'] / det['head_channels_last_cpu_s']:.2f}")


def parse_case(text: str) -> tuple[str, int]:
    name, _, resolution = text.rpartition(":")
    dip_config(name)  # unknown names fail here, listing the valid sizes
    if not resolution.isdigit():
        raise ValueError(f"--case {text!r}: expected NAME:RESOLUTION, e.g. DiP-XL/16:256")
    return name, int(resolution)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="XL/16 only, batch 1, 1 warm-up, 1 timed pass")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU (1 with --quick), 32 on GPU")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (eager fallback)")
    parser.add_argument("--no-head-layouts", dest="head_layouts", action="store_false",
                        help="skip the contiguous vs channels-last head comparison")
    parser.add_argument("--case", action="append", default=[], metavar="NAME:RES",
                        help="benchmark these sizes instead (e.g. DiP-T/16:32); repeatable")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default); 1 avoids OpenMP thrashing on a loaded machine")
    parser.add_argument("--json", default="", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (32 if gpu else (1 if args.quick else 2))
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.iters = args.iters or (10 if gpu else (1 if args.quick else 2))
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    if min(args.batch, args.iters) < 1 or args.warmup < 0:
        parser.error("--batch and --iters must be >= 1, --warmup >= 0")
    cases = CASES[:1] if args.quick else CASES
    if args.case:
        cases = tuple(parse_case(text) for text in args.case)
    command = "python benchmarks/" + os.path.basename(__file__) + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    print(f"device: {device_label(device)} | torch {torch.__version__} | {args.precision} | batch {args.batch} | "
          f"warm-up {args.warmup}, timed {args.iters} | compile {args.compile}")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows = [run_case(name, resolution, args, device) for name, resolution in cases]
    for row in rows:
        print_row(row)
    load_after = os.getloadavg()[0]
    elapsed = time.perf_counter() - started
    print(f"\nload average (1 min) {load_before:.1f} before, {load_after:.1f} after; peak memory "
          f"{peak_memory_gib(device):.1f} GiB; {elapsed:.0f} s in all")
    result = {"date": datetime.date.today().isoformat(), "device": device_label(device), "torch": torch.__version__,
              "command": command, "precision": args.precision, "compile": args.compile, "load_avg_before": load_before,
              "load_avg_after": load_after, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    det = rows[0]["detailer"]
    print(f"\nRESULTS.md line: | {result['date']} | {result['device']} | torch {torch.__version__} | `{command}` | "
          f"{rows[0]['model']}: fwd {det['forward_images_per_s']:.3f} img/s, fwd+bwd "
          f"{det['forward_backward_images_per_s']:.3f} img/s, head {100 * det['head_flop_share']:.1f}% FLOPs / "
          f"{100 * rows[0]['head_time_share_training']:.1f}% train time |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
