"""Flags that more than one `dip` subcommand takes, defined once here.

Each helper keeps the help text and default each command had; where two commands word the help
differently (the sampling flags of `dip sample` and `dip eval run`), the helper takes it as a
parameter. Registration is cheap: nothing heavy is imported here.
"""
from __future__ import annotations

import argparse

# `dip submit` and every `dip jobs` action talk to a cluster's Ray job server
JOB_SERVER_ADDRESS_HELP = "the Ray job server, http://HEAD:8265 (default: $RAY_ADDRESS)"


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str = "a YAML file (see configs/)") -> None:
    """CONFIG.yaml [key=value ...]: the positionals of every command that loads a training config."""
    parser.add_argument("config", help=config_help)
    # default=[]: a '*' positional without one is "required" (argparse lists it as missing next to config)
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="override any config key, e.g. train.max_steps=500 cluster.num_workers=4 "
                             "(anywhere on the line, before or after the options)")


def parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--interval must be LO,HI (e.g. 0.11,0.97), got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"--interval needs 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def add_sampling_arguments(parser: argparse.ArgumentParser, cfg_help: str, interval_help: str,
                           steps: int = 100, seed: int = 0) -> None:
    """--steps --method --cfg --interval --timeshift --seed: how `dip sample` and `dip eval run` sample
    (models.sampling.sample); `steps` and `seed` are the defaults."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--method", choices=("euler", "heun"), default="euler")
    parser.add_argument("--cfg", type=float, default=1.0, help=cfg_help)
    parser.add_argument("--interval", type=parse_interval, default=(0.0, 1.0), help=interval_help)
    parser.add_argument("--timeshift", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=seed)


def add_job_server_address(parser: argparse.ArgumentParser) -> None:
    """--address of `dip submit` and `dip jobs ...`."""
    parser.add_argument("--address", default=None, help=JOB_SERVER_ADDRESS_HELP)
