"""The commands the docs tell a user to run exist, as spelt, and the ones that exist are
documented.

Make targets and the ``wecombot`` command line (its subcommands and their options) are a
public interface: the README and docs/ name each target of the Makefile and each
subcommand of :data:`wecombot.cli.COMMANDS` with its options, and name nothing else (a
renamed option would leave its old spelling in a runbook that then fails at 3 a.m.).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from wecombot import cli, dlq, doctor

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_in_docs() -> list[str]:
    """Every code span and every line of a fenced block in the docs: where commands are
    written to be typed (prose may say "make each part")."""
    found: list[str] = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
            found.extend(block.splitlines())
        unfenced = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
        found.extend(re.findall(r"`([^`\n]+)`", unfenced))
    return found


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    [phony] = re.findall(r"^\.PHONY: (.*)$", makefile, flags=re.M)
    return set(phony.split())


def documented_targets() -> set[str]:
    """``make run``, and ``make test-unit / test-integration`` names both."""
    found: set[str] = set()
    for code in code_in_docs():
        for run in re.findall(r"(?:^|[\s;(])make ([a-z][a-z0-9-]*(?: / [a-z][a-z0-9-]*)*)", code):
            found.update(run.split(" / "))
    return found


def test_every_make_target_the_docs_name_exists() -> None:
    assert documented_targets() - make_targets() == set()


def test_every_make_target_is_documented() -> None:
    assert make_targets() - documented_targets() == set()


# The command, not the namespace of `kubectl -n wecombot get …`.
COMMAND = r"(?<!-n )\bwecombot "


def test_the_readme_lists_every_wecombot_command_and_no_other() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `wecombot ([a-z]+)` \|", readme, flags=re.M))
    assert listed == set(cli.COMMANDS)


def test_every_wecombot_command_the_docs_name_exists() -> None:
    named = {m for code in code_in_docs() for m in re.findall(rf"{COMMAND}([a-z]+)", code)}
    assert named - set(cli.COMMANDS) == set()


def options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """A parser's option strings and subcommands, its subcommands' options included."""
    flags: set[str] = set()
    actions: set[str] = set()
    for action in parser._actions:
        flags.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                actions.add(name)
                flags |= options(sub)[0]
    return flags - {"--help"}, actions


PARSERS = {"dlq": dlq._parser(), "doctor": doctor._parser()}


def invocations(command: str) -> list[list[str]]:
    """The words after ``wecombot <command>`` wherever the docs write one out (a
    ``# comment`` in a block ends it)."""
    found: list[list[str]] = []
    for code in code_in_docs():
        for rest in re.findall(rf"{COMMAND}{command}\b([^#`|]*)", code):
            found.append(rest.split())
    return found


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_and_action_the_docs_write_exists(command: str) -> None:
    flags, actions = options(PARSERS[command])
    unknown: set[str] = set()
    for words in invocations(command):
        unknown |= {w.split("=")[0] for w in words if w.startswith("--")} - flags
        if words and not words[0].startswith("-") and actions:
            unknown |= {words[0]} - actions
    assert unknown == set()


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_is_documented(command: str) -> None:
    """Written out in a ``wecombot <command> …``, or in a span of its own (``--json``
    beside the command's description); ``kubectl … --timeout=5m`` is not doctor's."""
    flags, actions = options(PARSERS[command])
    written = [w for words in invocations(command) for w in words]
    written += [w for code in code_in_docs() if code.startswith("--") for w in code.split()]
    undocumented = flags - {w.split("=")[0] for w in written}
    undocumented |= {a for a in actions if [a] not in [ws[:1] for ws in invocations(command)]}
    assert undocumented == set()
