"""The one `dip` command: a thin dispatcher over the subcommands each layer owns.

Each entry below names a module with `register(subparsers)`; that function adds its subcommand(s)
and sets `handler=` on them. Registration must stay cheap: heavy imports (torch, ray, deepspeed,
mlflow) happen inside the handlers, so `dip --help` and bad flags answer instantly.

Every subcommand takes its options, positionals and `key=value` overrides in any order
(AnyOrderParser below: the one place that decides how `dip` parses). Flags that several
subcommands take are defined once, in cluster/cli/options.py.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from cluster.driver.errors import TrainingFailed

# One module per subcommand group. Order is the order shown by `dip --help`.
COMMAND_MODULES = (
    "cluster.cli.data",    # dip data shard
    "cluster.cli.train",   # dip train
    "cluster.cli.sample",  # dip sample
    "cluster.cli.export",  # dip export
    "cluster.cli.eval",    # dip eval ref-stats | fid | run
    "cluster.cli.jobs",    # dip submit / jobs
    "cluster.cli.plan",    # dip plan
)


class AnyOrderParser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands accept options and positionals in any order.

    Plain argparse fills a trailing `key=value ...` list only from the positionals before the first
    option, then refuses the rest (`dip plan C.yaml --gpus 8 model.x=1`: "unrecognized arguments").
    A leaf parser (one without subcommands of its own) therefore parses intermixed: options first,
    then every remaining word as a positional. add_subparsers makes each subcommand's parser of its
    parent's class, so every `dip` subcommand, nested ones included, parses this way.
    """

    _intermixing = False  # set while parse_known_intermixed_args calls back into parse_known_args

    def _can_intermix(self) -> bool:
        positionals = self._get_positional_actions()
        in_groups = {id(a) for group in self._mutually_exclusive_groups for a in group._group_actions}
        return (self._subparsers is None  # a command group: its subcommand's own parser intermixes
                and all(a.nargs not in (argparse.PARSER, argparse.REMAINDER) for a in positionals)
                and not any(id(a) in in_groups for a in positionals))

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or not self._can_intermix():
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = AnyOrderParser(prog="dip", description="Train and sample DiP pixel-space diffusion models.")
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
    args = parser.parse_args(argv)  # argparse prints a usage error and exits 2 on bad flags
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError) as err:
        # Bad input is the user's to fix: one clear line, not a traceback.
        print(f"dip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingFailed as err:
        print(f"dip {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
