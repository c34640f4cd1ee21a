"""`dip eval ref-stats | fid | run`: reference statistics, FID between two image sets, and the
offline evaluation of a checkpoint on the Ray eval pool. Heavy imports happen inside the handlers."""
from __future__ import annotations

import os

from cluster.cli.options import add_sampling_arguments

IS_NOTE = "IS n/a: the FID Inception weights have no 1008-class logits, so the Inception Score is not computed"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="FID / sFID / precision / recall: reference stats, image sets, checkpoints")
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])

    ref = sub.add_parser("ref-stats", help="reference statistics (.npz) of a dataset")
    ref.add_argument("--data", required=True,
                     help="'synthetic', an ImageFolder tree, a shard dir, an image folder or an .npz")
    ref.add_argument("--out", required=True, help="output .npz (mu, sigma, mu_s, sigma_s, pool_features)")
    ref.add_argument("--num-samples", type=int, default=None, help="exactly this many images, class-balanced")
    ref.add_argument("--image-size", type=int, default=None, help="resolution (ADM center crop for image folders)")
    ref.add_argument("--num-classes", type=int, default=None, help="classes (synthetic data, unlabelled shards)")
    ref.add_argument("--seed", type=int, default=0, help="synthetic data: which procedural set")
    ref.add_argument("--start", type=int, default=0, help="synthetic data: first image index")
    ref.add_argument("--pr-reference-size", type=int, default=10_000,
                     help="reference features kept for precision/recall (ADM uses 10K)")
    _add_device_args(ref)
    ref.set_defaults(handler=_ref_stats)

    fid = sub.add_parser("fid", help="FID between two image sets; the last line printed is 'FID <number>'")
    fid.add_argument("path_a", help="image folder, .npz batch (arr_0) or reference statistics .npz (mu, sigma)")
    fid.add_argument("path_b", help="image folder, .npz batch (arr_0) or reference statistics .npz (mu, sigma)")
    _add_device_args(fid)
    _add_fid_method(fid)
    fid.set_defaults(handler=_fid)

    run = sub.add_parser("run", help="evaluate a checkpoint's EMA model on the Ray eval pool")
    run.add_argument("checkpoint", help="a step-N/ checkpoint directory, an ema.pt, a `dip export` or Lightning file")
    run.add_argument("--ref", required=True,
                     help="reference statistics .npz (dip eval ref-stats, or an ADM reference batch)")
    run.add_argument("--num-samples", type=int, default=50_000)
    add_sampling_arguments(run, cfg_help="guidance scale (1 = no guidance)", interval_help="guidance interval LO,HI")
    run.add_argument("--image-size", type=int, default=None,
                     help="a multiple of the patch size (default: the resolution the checkpoint's run trained "
                          "at; 16 patches a side when the file does not record it)")
    run.add_argument("--num-classes", type=int, default=None,
                     help="evaluate the first N classes (default: all of the model's)")
    run.add_argument("--batch-size", type=int, default=64, help="samples per work unit")
    run.add_argument("--num-actors", type=int, default=1)
    run.add_argument("--cpus-per-actor", type=float, default=1.0)
    run.add_argument("--gpus-per-actor", type=float, default=0.0)
    run.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    run.add_argument("--save-npz", default=None, help="also write the ADM sample batch (uint8 arr_0, labels arr_1)")
    _add_fid_method(run)
    run.set_defaults(handler=_run)


def _add_fid_method(parser) -> None:
    parser.add_argument("--fid-method", default="sqrtm", choices=("sqrtm", "eigh"),
                        help="sqrtm: scipy.linalg.sqrtm, the standard (default); eigh: the same trace from a "
                             "symmetric eigenproblem, much faster on CPUs")


def _add_device_args(parser) -> None:
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when there is one)")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device {name!r}: choose cpu, cuda, cuda:N or auto")
    return name


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def _ref_stats(args) -> int:
    from trainer.eval.datasets import DatasetRequest, build_reference

    request = DatasetRequest(data=args.data, num_samples=args.num_samples, image_size=args.image_size,
                             num_classes=args.num_classes, seed=args.seed, start=args.start,
                             batch_size=args.batch_size)
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out {args.out}: must end in .npz")
    with _progress(args.num_samples, "ref-stats") as bar:
        _, counts = build_reference(request, args.out, _device(args.device), args.pr_reference_size, bar.update)
    print(f"{args.data}: {counts.images} images ({counts.skipped} unreadable, skipped) -> {args.out}")
    return 0


def _fid(args) -> int:
    from trainer.eval.compare import SetStatisticsReader, compare_sets

    reader = SetStatisticsReader(_device(args.device), args.batch_size, _progress)
    sides = []
    for path in (args.path_a, args.path_b):
        stats = reader.read(path)
        print(f"{path}: precomputed statistics" if stats.images is None
              else f"{path}: {stats.images} images ({stats.skipped} unreadable, skipped)")
        sides.append(stats)
    result = compare_sets(*sides, fid_method=args.fid_method)
    if result.sfid is not None:
        print(f"sFID {result.sfid:.10g}")
    if result.precision is not None:
        print(f"precision {result.precision:.6g} recall {result.recall:.6g} (of {args.path_b} against {args.path_a})")
    print(IS_NOTE)
    print(f"FID {result.fid:.10g}")
    return 0


def _run(args) -> int:
    import ray

    from trainer.eval.pool import EvalPool
    from trainer.eval.spec import SamplingSpec
    from trainer.model_io import checkpoint_facts

    image_size, num_classes = args.image_size, args.num_classes
    if image_size is None or os.path.exists(args.checkpoint):  # else only the cluster's nodes can read it
        facts = checkpoint_facts(args.checkpoint)  # checked here, before any actor starts
        image_size, _ = facts.image_side(image_size, "--image-size")
        num_classes = facts.check_num_classes(num_classes, "--num-classes")
    spec = SamplingSpec(steps=args.steps, method=args.method, cfg_scale=args.cfg, cfg_interval=args.interval,
                        timeshift=args.timeshift, num_samples=args.num_samples, seed=args.seed,
                        batch_size=args.batch_size, num_classes=num_classes, image_size=image_size)
    resources = {"num_cpus": args.cpus_per_actor}
    if args.gpus_per_actor > 0:
        resources["num_gpus"] = args.gpus_per_actor
    if args.address:
        ray.init(address=args.address, include_dashboard=False)
    pool = EvalPool(args.num_actors, resources, args.ref, fid_method=args.fid_method)
    try:
        with _progress(spec.num_samples, "eval") as bar:
            result = pool.evaluate(args.checkpoint, spec, save_npz=args.save_npz, on_samples=bar.update)
    finally:
        pool.close()
    if args.save_npz:
        print(f"samples: {args.save_npz} (ADM format, uint8 arr_0)")
    if result.actor_restarts:
        print(f"eval actors restarted: {result.actor_restarts}")
    for name in ("sfid", "precision", "recall"):
        value = getattr(result, name)
        print(f"{name} {'n/a' if value is None else f'{value:.6g}'}")
    print(f"{result.num_samples} samples in {result.seconds:.1f} s")
    print(IS_NOTE)
    print(f"FID {result.fid:.10g}")
    return 0
