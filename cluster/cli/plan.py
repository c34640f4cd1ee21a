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
    parser.set_defaults(handler=run_plan)


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
    return 0
