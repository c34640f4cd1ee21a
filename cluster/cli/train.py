"""`dip train CONFIG.yaml [key=value ...]`: load and check the config, then run the driver."""
from __future__ import annotations

import argparse

from cluster.cli.options import add_config_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a DiP model on Ray + DeepSpeed (resumes a run of the same name)",
        description="Train a DiP model: starts or attaches to a Ray cluster and runs DeepSpeed ZeRO workers. "
                    "Re-running the same command (same run_name) resumes from the newest committed checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dip train configs/quickstart_cpu.yaml\n"
               "  dip train configs/dip_xl16_256.yaml data.path=/data/imagenet-mds optim.lr=2e-4 run_name=xl16-a\n"
               "  dip train configs/dip_xl16_256.yaml --check cluster.num_workers=16   # the resolved config, no run")
    add_config_arguments(parser)
    parser.add_argument("--check", action="store_true", help="validate and print the resolved config, then exit")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from trainer.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.check:
        print(f"# {cfg.batch_arithmetic()}")
        print(to_yaml(cfg), end="")
        return 0
    from cluster.driver.launch import launch
    from trainer.loop.run import configure_logging

    configure_logging()  # the driver's own lines too: eval results, checkpoint notices
    try:
        summary = launch(cfg)
    finally:
        _skip_the_final_collection()
    return 0 if summary.status in ("FINISHED", "STOPPED") else 1


def _skip_the_final_collection() -> None:
    """The interpreter's last garbage collection walks every object the driver still holds (torch, Ray,
    DeepSpeed, MLflow): 6-10 s measured on the busy 2-core machine between the summary and the exit, time
    a stop's grace period before SIGKILL does not have. The process is about to end and nothing needs
    collecting: gc.freeze() moves the heap out of that collection's reach (refcounting still frees it)."""
    import gc

    gc.freeze()
