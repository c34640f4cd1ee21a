"""`dip sample`: sample a PNG grid from a checkpoint (the authors' format or ours) with EMA weights.

Resolution and classes default to what the checkpoint records (trainer.model_io.checkpoint_facts):
the resolution its run trained at, the classes of its model. A flag wins; one the model cannot
take is refused. The sampling itself is trainer/sampling.py."""
from __future__ import annotations

import argparse

from cluster.cli.options import add_sampling_arguments


def _labels(text: str) -> list[int]:
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--labels must be comma-separated integers, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("--labels needs at least one label")
    return labels


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample an image grid from a checkpoint",
                              description="Sample with the EMA weights of a checkpoint and write a PNG grid.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="authors' .ckpt, a `dip export` file, or a step-N/ / run checkpoint dir")
    source.add_argument("--init-model", metavar="SIZE", help="a freshly initialised model of this size (smoke tests)")
    p.add_argument("--labels", type=_labels, default=None,
                   help="class labels, comma-separated (default: the first 4 classes of the model)")
    add_sampling_arguments(p, cfg_help="classifier-free guidance scale (paper: 2.9)",
                           interval_help="guidance interval LO,HI (paper: 0.11,0.97)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a multiple of the patch size (default: the resolution the "
                        "checkpoint's run trained at; 16 patches a side when the file does not record it)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of an --init-model (default 10); a checkpoint's model has its own")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on GPU (CPU runs fp32)")
    p.add_argument("--benchmark", action="store_true", help="time sampling and print seconds/image, images/s")
    p.add_argument("--out", default="grid.png")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tqdm import tqdm

    from trainer.sampling import labels_to_sample, model_to_sample, sample_pixels, sampling_device, save_grid

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    device = sampling_device(args.device)
    model, side, side_from = model_to_sample(args.checkpoint, args.init_model, device, resolution=args.resolution,
                                             num_classes=args.num_classes, seed=args.seed)
    labels = labels_to_sample(args.labels, model.config.num_classes)

    net = model
    if args.compile:
        from models.speed import maybe_compile
        net = maybe_compile(model, enabled=True, dynamic=False)

    if args.benchmark:
        from models.speed import time_sampling
        stats = time_sampling(net, batch=len(labels), steps=args.steps, cfg=args.cfg, device=device,
                              resolution=side, method=args.method, cfg_interval=args.interval,
                              precision=args.precision)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        return 0
    with tqdm(total=args.steps, desc="sampling", unit="step") as bar:
        pixels = sample_pixels(net, labels, side, seed=args.seed, steps=args.steps, method=args.method,
                               cfg_scale=args.cfg, cfg_interval=args.interval, timeshift=args.timeshift,
                               device=device, precision=args.precision,
                               callback=lambda k, n: bar.update(1)).numpy()  # (B, H, W, C)
    save_grid(pixels, side, args.out)
    print(f"wrote {args.out} ({len(pixels)} samples, {side}x{side} ({side_from}), {args.steps} {args.method} steps, "
          f"cfg {args.cfg})")
    return 0
