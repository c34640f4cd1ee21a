"""`dip sample`: sample a PNG grid from a checkpoint (the authors' format or ours) with EMA weights.

Resolution and classes default to what the checkpoint records (trainer.model_io.checkpoint_facts):
the resolution its run trained at, the classes of its model. A flag wins; one the model cannot
take is refused."""
from __future__ import annotations

import argparse
import math
import os


def _labels(text: str) -> list[int]:
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--labels must be comma-separated integers, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("--labels needs at least one label")
    return labels


def parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--interval must be LO,HI (e.g. 0.11,0.97), got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"--interval needs 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample an image grid from a checkpoint",
                              description="Sample with the EMA weights of a checkpoint and write a PNG grid.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="authors' .ckpt, a `dip export` file, or a step-N/ / run checkpoint dir")
    source.add_argument("--init-model", metavar="SIZE", help="a freshly initialised model of this size (smoke tests)")
    p.add_argument("--labels", type=_labels, default=None,
                   help="class labels, comma-separated (default: the first 4 classes of the model)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--method", choices=("euler", "heun"), default="euler")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (paper: 2.9)")
    p.add_argument("--interval", type=parse_interval, default=(0.0, 1.0), help="guidance interval LO,HI (paper: 0.11,0.97)")
    p.add_argument("--timeshift", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a multiple of the patch size (default: the resolution the "
                        "checkpoint's run trained at; 16 patches a side when the file does not record it)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of an --init-model (default 10); a checkpoint's model has its own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on GPU (CPU runs fp32)")
    p.add_argument("--benchmark", action="store_true", help="time sampling and print seconds/image, images/s")
    p.add_argument("--out", default="grid.png")
    p.set_defaults(handler=run)


def sample_pixels(model, labels: list[int], side: int, seed: int = 0, steps: int = 100, method: str = "euler",
                  cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), timeshift: float = 1.0,
                  device="cpu", precision: str = "bf16", callback=None):
    """What `dip sample` draws: uint8 (B, side, side, C) images of `labels`, from noise seeded by `seed`
    (drawn on the CPU, so every device starts from the same noise)."""
    import torch

    from models.sampling import sample, to_uint8
    from models.speed import mixed_precision

    config = model.config
    device = torch.device(device)
    label_tensor = torch.tensor(labels, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(len(labels), config.in_channels, side, side, generator=generator).to(device)
    with mixed_precision(device, precision):
        x = sample(model, noise, label_tensor, steps=steps, method=method, cfg_scale=cfg_scale,
                   cfg_interval=cfg_interval, timeshift=timeshift, null_label=config.num_classes, callback=callback)
    return to_uint8(x)


def run(args) -> int:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from models.registry import create_model
    from trainer.model_io import checkpoint_facts, sampling_side

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.checkpoint:  # every flag is checked against what the checkpoint records before loading it
        facts = checkpoint_facts(args.checkpoint)
        if args.num_classes not in (None, facts.config.num_classes):
            raise ValueError(f"--num-classes {args.num_classes}: the checkpoint's model has "
                             f"{facts.config.num_classes} classes (--num-classes is for --init-model)")
        side, side_from = facts.image_side(args.resolution, "--resolution")
        model = facts.load_model(device)  # the file checkpoint_facts resolved and verified
    else:
        torch.manual_seed(args.seed)
        num_classes = 10 if args.num_classes is None else args.num_classes
        model = create_model(args.init_model, num_classes=num_classes).to(device).eval()
        side, side_from = sampling_side(model.config, args.resolution, None, "--resolution")
    config = model.config
    if args.labels is None:
        args.labels = list(range(min(4, config.num_classes)))
    bad = [y for y in args.labels if not 0 <= y <= config.num_classes]
    if bad:
        raise ValueError(f"--labels {bad} outside 0..{config.num_classes} ({config.num_classes} = null label)")

    net = model
    if args.compile:
        from models.speed import maybe_compile
        net = maybe_compile(model, enabled=True, dynamic=False)

    if args.benchmark:
        from models.speed import time_sampling
        stats = time_sampling(net, batch=len(args.labels), steps=args.steps, cfg=args.cfg, device=device,
                              resolution=side, method=args.method, cfg_interval=args.interval,
                              precision=args.precision)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        return 0
    with tqdm(total=args.steps, desc="sampling", unit="step") as bar:
        pixels = sample_pixels(net, args.labels, side, seed=args.seed, steps=args.steps, method=args.method,
                               cfg_scale=args.cfg, cfg_interval=args.interval, timeshift=args.timeshift,
                               device=device, precision=args.precision,
                               callback=lambda k, n: bar.update(1)).numpy()  # (B, H, W, C)
    cols = math.ceil(math.sqrt(len(pixels)))
    rows = math.ceil(len(pixels) / cols)
    grid = Image.new("RGB", (cols * side, rows * side))
    for i, image in enumerate(pixels):
        grid.paste(Image.fromarray(image), ((i % cols) * side, (i // cols) * side))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(pixels)} samples, {side}x{side} ({side_from}), {args.steps} {args.method} steps, "
          f"cfg {args.cfg})")
    return 0
