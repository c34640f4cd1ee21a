"""`dip`: every subcommand takes its options and `key=value` overrides in any order (cluster.cli.main.AnyOrderParser)."""
from __future__ import annotations

import pytest

from cluster.cli.main import AnyOrderParser, main
from tests.test_docs_examples import REPO, leaf_parsers


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch):
    monkeypatch.chdir(REPO)


def test_the_issue_commands_run_as_written_and_their_overrides_count(capsys):
    assert main(["plan", "configs/dip_xl64_1024.yaml", "--gpus", "8", "--gpu-memory", "80GB",
                 "model.activation_checkpointing=false"]) == 0
    assert "activation checkpointing off" in capsys.readouterr().out.splitlines()[0]  # the config says on
    assert main(["submit", "configs/dip_xl16_256.yaml", "--address", "http://10.0.0.1:8265", "output_dir=/shared/runs",
                 "checkpoint.path=s3://my-bucket/dip", "--dry-run", "data.path=s3://my-bucket/imagenet-256"]) == 0
    entrypoint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("entrypoint"))
    assert entrypoint.endswith("train configs/dip_xl16_256.yaml output_dir=/shared/runs "
                               "checkpoint.path=s3://my-bucket/dip data.path=s3://my-bucket/imagenet-256")
    assert main(["train", "configs/quickstart_cpu.yaml", "--check", "train.max_steps=7"]) == 0
    assert "  max_steps: 7\n" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["train", "configs/quickstart_cpu.yaml", "run_name=a", "train.max_steps=7", "--check"],
    ["train", "--check", "configs/quickstart_cpu.yaml", "run_name=a", "train.max_steps=7"],
    ["train", "configs/quickstart_cpu.yaml", "run_name=a", "--check", "train.max_steps=7"],
])
def test_train_resolves_the_same_config_in_every_order(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "run_name: a\n" in out and "  max_steps: 7\n" in out
    reference = ["train", "configs/quickstart_cpu.yaml", "--check", "run_name=a", "train.max_steps=7"]
    assert main(reference) == 0 and capsys.readouterr().out == out


@pytest.mark.parametrize("command, options", [("train", ["--check"]), ("plan", ["--gpus", "2"]),
                                              ("submit", ["--dry-run", "--address", "http://h:8265"])])
def test_a_malformed_override_gets_the_same_clear_error_wherever_it_stands(command, options, capsys):
    for argv in ([command, "configs/quickstart_cpu.yaml", "oops", *options],
                 [command, "configs/quickstart_cpu.yaml", *options, "oops"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"dip {command}: error: configs/quickstart_cpu.yaml: override 'oops' is not valid: "
                       "expected key=value, e.g. optim.lr=3e-4"), argv


def test_a_missing_config_is_the_only_thing_reported_missing(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--check"])
    assert "the following arguments are required: config\n" in capsys.readouterr().err  # not "config, key=value"


def test_every_subcommand_parses_in_any_order():
    """A subcommand added later inherits the parser class; this catches one that cannot intermix
    (a positional in a mutually exclusive group, nargs=REMAINDER) and would fall back to argparse's order."""
    leaves = [(name, p) for name, p in leaf_parsers() if p._subparsers is None]
    assert len(leaves) >= 12
    stuck = [name for name, parser in leaves if not (isinstance(parser, AnyOrderParser) and parser._can_intermix())]
    assert not stuck
