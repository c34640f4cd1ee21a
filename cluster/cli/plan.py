"""`dip plan CONFIG.yaml [--gpus N] [--gpu-memory 80GB] [key=value ...]`: the per-GPU memory plan of a
config (cluster/planning/), printed. Registration is cheap: torch loads inside the handler."""
from __future__ import annotations

import argparse

from cluster.cli.options import add_config_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="per-GPU memory of a config for every ZeRO stage, and the largest micro-batch",
        description="Print, for ZeRO stages 0-3, the per-GPU memory of parameters, gradients, optimizer states, "
                    "EMA and activations (with and without activation checkpointing), the largest micro-batch "
                    "that fits and the resulting global batch. Warns when the config will not fit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dip plan configs/dip_xl16_256.yaml --gpus 8 --gpu-memory 80GB\n"
               "  dip plan configs/dip_xl64_1024.yaml --gpus 8 --gpu-memory 80GB model.activation_checkpointing=false")
    add_config_arguments(parser)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (data-parallel ranks); default: cluster.num_workers")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB, 24GiB (default 80GB)")
    parser.add_argument("--reserve", default="2GB",
                        help="per-GPU memory kept back for the CUDA context, NCCL/cuDNN workspaces and "
                             "fragmentation (default 2GB)")
    add_goodput_arguments(parser)
    parser.set_defaults(handler=run_plan)


def add_goodput_arguments(parser) -> None:
    """The failure-rate part of the plan (cluster/planning/goodput.py): printed when --mtbf-hours is given."""
    parser.add_argument("--mtbf-hours", type=float, default=None,
                        help="mean time between failures of ONE GPU, in hours (the job's is this / --gpus); adds the "
                             "checkpoint interval that maximises goodput, the expected goodput and the time to train")
    parser.add_argument("--checkpoint-cost-s", type=float, default=None,
                        help="seconds a checkpoint blocks training (measured: MLflow checkpoint_blocking_s; "
                             "default 10, printed as assumed)")
    parser.add_argument("--restart-s", type=float, default=None,
                        help="seconds a restart after a failure costs (measured: badput/recovery_s per failure; "
                             "default 180, printed as assumed)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time to train "
                                                               "(default 0.4)")
    parser.add_argument("--gpu-kind", default="H100", help="GPU whose dense bf16 peak the time to train uses "
                                                           "(default H100; see trainer/tracking/mfu.py)")


def run_plan(args) -> int:
    from cluster.planning.memory import Hardware, make_plan, parse_size
    from cluster.planning.report import format_elastic_ends, format_plan
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    gpus = cfg.cluster.max_workers if args.gpus is None else args.gpus
    hardware = Hardware(gpus=gpus, gpu_memory=parse_size(args.gpu_memory), reserve=parse_size(args.reserve))
    plan = make_plan(cfg, hardware, config_name=args.config)
    print(format_plan(plan))
    if cfg.cluster.elastic:
        print(format_elastic_ends(cfg, hardware))
    if args.mtbf_hours is not None:
        from cluster.planning.goodput import format_goodput_plan, make_goodput_plan

        print(format_goodput_plan(make_goodput_plan(cfg, gpus=gpus, mtbf_hours=args.mtbf_hours,
                                                    checkpoint_s=args.checkpoint_cost_s, restart_s=args.restart_s,
                                                    mfu=args.mfu, gpu_kind=args.gpu_kind)))
    return 0
