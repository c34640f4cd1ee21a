"""The one `dip` command: a thin dispatcher over the subcommands each layer owns.

Each entry below names a module with `register(subparsers)`; that function adds its subcommand(s)
and sets `handler=` on them. Registration must stay cheap: heavy imports (torch, ray, deepspeed,
mlflow) happen inside the handlers, so `dip --help` and bad flags answer instantly.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, why it lives there). Order is the order shown by `dip --help`.
COMMAND_MODULES = (
    "data.commands",          # dip data shard
    "cluster.train_cmd",      # dip train
    "trainer.sample_cmd",     # dip sample
    "trainer.commands",       # dip export
    "trainer.eval.commands",  # dip eval ...
    "cluster.commands",       # dip submit / jobs / plan
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dip", description="Train and sample DiP pixel-space diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a layer not built yet must not break the others
            if err.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError) as err:
        # Bad input is the user's to fix: one clear line, not a traceback.
        print(f"dip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
