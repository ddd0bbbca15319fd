"""The commands the README and docs/ show must be commands this package has: a reader copies them.

Every `nnunet-compress` line in a ```bash block names a real subcommand (and `plan` method), and every long option
on it is one that subcommand accepts; a benchmark run as a module exists; the other lines start with a program a
user has after set-up."""

from __future__ import annotations

import argparse
import re

import pytest
from test_docs_links import PAGES, REPO

from nnunet_compress.cli.main import build_parser

BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
PROGRAMS = {"TotalSegmentator", "bash", "source", "export", "git", "pip", "cd", ".venv/bin/python",
            ".venv/bin/pip", "python"}
OPTION = re.compile(r"^--[a-z][a-z0-9\-]*")


def command_lines(text: str) -> list[list[str]]:
    """The commands of a page's bash blocks as token lists: continuations joined, comments and leading
    `VAR=value` assignments dropped."""
    commands = []
    for block in BASH_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = line.split(" #")[0].split()
            while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
                tokens = tokens[1:]
            if tokens and not tokens[0].startswith("#"):
                commands.append(tokens)
    return commands


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def problems(tokens: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with one command line (empty when it is a command this package or set-up provides)."""
    program = tokens[0]
    if program in (".venv/bin/python", "python") and tokens[1:2] == ["-m"] and len(tokens) > 2:
        module = REPO / (tokens[2].replace(".", "/") + ".py")
        return [] if module.is_file() or not tokens[2].startswith("benchmarks.") else [f"no module {tokens[2]}"]
    if program != "nnunet-compress":
        return [] if program.startswith("nnUNetv2_") or program in PROGRAMS else [f"unknown program {program!r}"]
    commands = subparsers(parser)
    if len(tokens) < 2 or tokens[1] not in commands:
        return [f"no subcommand {tokens[1:2]}"]
    targets = [commands[tokens[1]]]
    if tokens[1] == "plan":
        methods = subparsers(targets[0])
        names = tokens[2].split("|") if len(tokens) > 2 else []
        if not names or any(n not in methods for n in names):
            return [f"no plan method {tokens[2:3]}"]
        targets = [methods[n] for n in names]
    known = set.union(*(options(t) for t in targets))
    flags = (OPTION.match(t.lstrip("[")) for t in tokens[2:])
    return [f"{tokens[1]} has no option {f.group()}" for f in flags if f and f.group() not in known]


def test_the_check_flags_typos():
    parser = build_parser()
    assert problems("nunet-compress auto $BASE".split(), parser) == ["unknown program 'nunet-compress'"]
    assert problems("nnunet-compress tucker $BASE --rank-ratoi 0.3".split(), parser) == [
        "tucker has no option --rank-ratoi"]
    assert problems("nnunet-compress plan tucker|taylor -d 1 [--seed 3]".split(), parser) == []
    assert problems("nnunet-compress plan pruned -d 1".split(), parser) == ["no plan method ['pruned']"]
    assert problems(".venv/bin/python -m benchmarks.speeed --runs 3".split(), parser) == [
        "no module benchmarks.speeed"]
    assert command_lines("```bash\nA=1 nnunet-compress demo \\\n   --fast   # quick\n# note\n```\n") == [
        ["nnunet-compress", "demo", "--fast"]]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_shown_commands_exist(page):
    parser = build_parser()
    found = [f"{' '.join(tokens)}: {'; '.join(p)}" for tokens in command_lines(page.read_text())
             if (p := problems(tokens, parser))]
    assert not found, f"{page.relative_to(REPO)}:\n" + "\n".join(found)
