"""Every `dip ...` example in README.md, docs/*.md and the subcommands' `--help` epilogs runs as written.

`dip train` runs with --check, `dip submit` with --dry-run and `dip plan` for real, in-process
(none of them starts Ray); every other command is parsed by the real parser, since its work needs
data, checkpoints or a cluster. Before that, placeholders become real values: `[optional]` parts are
kept, `a|b` choices are tried one by one, CONFIG.yaml / JOB_ID / N ... get values, and absolute paths
that only exist on a cluster (/shared/runs, /shards/in1k ...) become directories in a temp dir.
A new example that does not parse fails here, naming its file, line and command.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DIP_PREFIXES = ("dip", ".venv/bin/dip")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1"}
# train / submit run in the mode that checks everything and starts nothing; plan only computes.
SAFE_FLAG = {"train": "--check", "submit": "--dry-run", "plan": None}
# Placeholder words of the docs' synopses -> real values ({sandbox}: this test's temp dir).
PLACEHOLDERS = {
    "CONFIG.yaml": "configs/quickstart_cpu.yaml",
    "key=value": "output_dir={sandbox}/runs",  # absolute: `dip submit` refuses relative outputs
    "CHECKPOINT": "{sandbox}/checkpoints",
    "PATH": "{sandbox}/images", "DIR": "{sandbox}/shards", "PATH_A": "{sandbox}/a", "PATH_B": "{sandbox}/b",
    "JOB_ID": "dip-example-20250101-000000-abc123",
    "NAME=VALUE": "OMP_NUM_THREADS=1",
    "N": "32", "K": "2", "C": "4", "S": "0",
}
IN_TOKEN = [(re.compile(r"(?<=://)HEAD(?=[:/]|$)"), "127.0.0.1"),  # http://HEAD:8265
            (re.compile(r"(?<=s3://)BUCKET(?=/|$)"), "dip-docs-bucket")]


@dataclass(frozen=True)
class Example:
    where: str     # "docs/cluster.md:24", or "`dip submit --help` epilog:2" (file or epilog : line)
    command: str   # as written, continuation lines joined


# ----------------------------------------------------------------------------------------------
#                                         Collecting
# ----------------------------------------------------------------------------------------------

def joined_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(number of the first line, text) with `\\`-continued lines joined."""
    out, pending, start = [], "", 0
    for number, line in lines:
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def fenced_lines(markdown: str) -> list[tuple[int, str]]:
    """The lines inside ``` fences, numbered from 1."""
    inside, lines = False, []
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append((number, line))
    return lines


def dip_commands(lines: list[tuple[int, str]], where: str) -> list[Example]:
    examples = []
    for number, line in joined_lines(lines):
        text = line.strip().removeprefix("$ ")
        if text.split(" ", 1)[0] in DIP_PREFIXES and " " in text:
            examples.append(Example(f"{where}:{number}", text))
    return examples


def doc_examples() -> list[Example]:
    found = []
    for path in DOC_FILES:
        found += dip_commands(fenced_lines(path.read_text()), str(path.relative_to(REPO)))
    return found


def leaf_parsers(parser=None, prefix: str = "dip"):
    """(command path, parser) of every subcommand, nested ones included."""
    parser = parser or build_parser()
    for action in parser._actions:
        if getattr(action, "choices", None) and hasattr(action, "_name_parser_map"):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from leaf_parsers(sub, f"{prefix} {name}")


def epilog_examples() -> list[Example]:
    found = []
    for command, parser in leaf_parsers():
        if parser.epilog:
            found += dip_commands(list(enumerate(parser.epilog.splitlines(), 1)), f"`{command} --help` epilog")
    return found


# ----------------------------------------------------------------------------------------------
#                          From an example to the argument lists to run
# ----------------------------------------------------------------------------------------------

def variants(command: str) -> list[list[str]]:
    """The argument lists (after `dip`) an example stands for: `[...]` optional parts kept, one list
    per position of the `a|b|c` choices (choice i of every group; a shorter group keeps its last)."""
    tokens = shlex.split(command, comments=True)[1:]
    for i, token in enumerate(tokens):
        if token in SHELL_OPERATORS:  # a pipe or a second command: only the dip command counts
            tokens = tokens[:i]
            break
    words, depth = [], 0
    for token in tokens:
        opened = len(token) - len(token.lstrip("["))
        depth += opened
        token = token[opened:]
        closed = min(depth, len(token) - len(token.rstrip("]")))  # `x=[2,8]` outside a group keeps its ]
        depth -= closed
        token = token[:len(token) - closed] if closed else token
        if token and token != "...":
            words.append(token)
    choices = [w.split("|") if "|" in w else [w] for w in words]
    count = max(len(c) for c in choices) if choices else 1
    return [[c[min(i, len(c) - 1)] for c in choices] for i in range(count)]


def cluster_path(path: str, sandbox: Path) -> str:
    """An absolute path that does not exist here (/shared/runs) -> the same path under the sandbox."""
    if not path.startswith("/") or Path(path).exists() or path.startswith(str(sandbox)):
        return path
    local = sandbox / path.lstrip("/")
    (local.parent if local.suffix else local).mkdir(parents=True, exist_ok=True)
    return str(local)


def concrete(words: list[str], sandbox: Path) -> list[str]:
    out = []
    for word in words:
        word = PLACEHOLDERS.get(word, word).format(sandbox=sandbox)
        for pattern, value in IN_TOKEN:
            word = pattern.sub(value, word)
        key, sep, value = word.partition("=")  # key=/path overrides and --flag=/path options alike
        out.append(f"{key}={cluster_path(value, sandbox)}" if sep else cluster_path(word, sandbox))
    return out


def safe_argv(argv: list[str]) -> tuple[list[str], bool]:
    """(argv to run, whether to run it) for the example's command."""
    if argv and argv[0] in SAFE_FLAG:
        flag = SAFE_FLAG[argv[0]]
        return (argv + [flag] if flag and flag not in argv else argv), True
    return argv, False


# ----------------------------------------------------------------------------------------------
#                                           The tests
# ----------------------------------------------------------------------------------------------

def cases(examples: list[Example]) -> list:
    params = []
    for example in examples:
        try:
            argvs = variants(example.command)
        except ValueError as err:  # an unbalanced quote: reported by the test of this example
            argvs = [f"cannot split it into words: {err}"]
        params += [pytest.param(example, words, id=f"{example.where}[{i}]" if len(argvs) > 1 else example.where)
                   for i, words in enumerate(argvs)]
    return params


EXAMPLES = doc_examples() + epilog_examples()


def test_the_examples_are_found():
    """The collector itself: a regression that finds nothing must not pass silently."""
    files = {e.where.rsplit(":", 1)[0] for e in EXAMPLES}
    assert {"README.md", "docs/cluster.md", "docs/training.md", "docs/data.md", "docs/eval.md"} <= files, sorted(files)
    commands = {e.where.split(" --help")[0] for e in epilog_examples()}
    assert {"`dip train", "`dip submit", "`dip plan"} <= commands
    subcommands = {shlex.split(e.command, comments=True)[1] for e in EXAMPLES}
    assert {"data", "train", "sample", "export", "eval", "submit", "jobs", "plan"} <= subcommands
    # a continued line is one example: the cluster.md submit carries its overrides
    continued = [e for e in EXAMPLES if e.where.startswith("docs/cluster.md:") and "dip submit" in e.command
                 and "data.path=s3://BUCKET/imagenet-256-mds" in e.command]
    assert continued and "\\" not in continued[0].command


@pytest.mark.parametrize("example, words", cases(EXAMPLES))
def test_every_documented_command_runs(example, words, tmp_path, capsys, monkeypatch):
    assert isinstance(words, list), f"{example.where}: `{example.command}`: {words}"
    monkeypatch.chdir(REPO)  # the examples name configs/... relative to the checkout
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv, run = safe_argv(concrete(words, tmp_path))
    shown = f"{example.where}: `{example.command}`\n  ran as: dip {shlex.join(argv)}"
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        if run:
            code = main(argv)
        else:
            args = build_parser().parse_args(argv)
            unfinished = [k for k, v in vars(args).items() if k.endswith("command") and v is None]
            assert not unfinished and getattr(args, "handler", None), f"{shown}\n  names no complete command"
            code = 0
    except SystemExit as exit_:  # argparse: a usage error
        code = exit_.code
    out = capsys.readouterr()
    assert code == 0, f"{shown}\n  exit {code}:\n{(out.err or out.out)[-1500:]}"
    if run:
        assert out.out.strip(), f"{shown}\n  printed nothing"
        ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        assert ray_was_up or not ray_up, f"{shown}\n  started Ray"


# ---------------------------------- the collector's own rules ----------------------------------

def test_variants_expand_optional_parts_and_choices_but_keep_list_values():
    assert variants("dip jobs logs JOB_ID [--follow]    --address http://HEAD:8265") == \
        [["jobs", "logs", "JOB_ID", "--follow", "--address", "http://HEAD:8265"]]
    assert variants("dip x --deps image|pip [--env NAME=VALUE] [key=value ...]  # note") == \
        [["x", "--deps", "image", "--env", "NAME=VALUE", "key=value"],
         ["x", "--deps", "pip", "--env", "NAME=VALUE", "key=value"]]
    assert variants("dip train c.yaml cluster.num_workers=[2,8] [--num-images K --classes C]") == \
        [["train", "c.yaml", "cluster.num_workers=[2,8]", "--num-images", "K", "--classes", "C"]]
    assert variants("dip jobs logs ID --follow | tail -5") == [["jobs", "logs", "ID", "--follow"]]


def test_continued_lines_are_one_example_and_prose_is_ignored():
    markdown = ("Run `dip train x.yaml` like so:\n```bash\n$ dip submit a.yaml --address http://h:1 \\\n"
                "    output_dir=/o\nmake test\n.venv/bin/dip plan b.yaml --gpus 2\n```\ndip train outside.yaml\n")
    found = dip_commands(fenced_lines(markdown), "X.md")
    assert found == [Example("X.md:3", "dip submit a.yaml --address http://h:1      output_dir=/o"),
                     Example("X.md:6", ".venv/bin/dip plan b.yaml --gpus 2")]


def test_cluster_paths_become_sandbox_directories(tmp_path):
    words = concrete(["submit", "CONFIG.yaml", "--address", "http://HEAD:8265", "output_dir=/shared/runs",
                      "checkpoint.path=s3://BUCKET/dip", "--out", "/shards/in1k", "optim.lr=2e-4"], tmp_path)
    assert words == ["submit", "configs/quickstart_cpu.yaml", "--address", "http://127.0.0.1:8265",
                     f"output_dir={tmp_path}/shared/runs", "checkpoint.path=s3://dip-docs-bucket/dip", "--out",
                     f"{tmp_path}/shards/in1k", "optim.lr=2e-4"]
    assert (tmp_path / "shared" / "runs").is_dir() and (tmp_path / "shards" / "in1k").is_dir()
