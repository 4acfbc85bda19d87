"""The log events the docs quote are events the code logs, spelt as it logs them.

Operators search and alert on the event names (``token.save_failed``,
``worker.newer_event``): a name in README, docs/ or the shipped alerts that no code logs
would send them after a line that never comes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "libs", ROOT / "services"]
DOCS = [
    ROOT / "README.md",
    ROOT / ".env.example",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "deploy").rglob("*.yaml")),
]
# What a log event is named after: the service or the shared module that logs it.
_EVENT = re.compile(
    r"`((?:gateway|llm|sender|token|worker|nats|service|callback|setup|dlq|dev|doctor"
    r"|console|health|http|runtime)\.[a-z][a-z_]*)`"
)
# Quoted the same way, but not events: files, and a nats-py module.
_NOT_EVENTS = re.compile(r"\.(py|yaml|md|conf|env|json)$|^nats\.micro$")


def strings_in_the_code() -> set[str]:
    found: set[str] = set()
    for source in SOURCES:
        for path in source.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
    return found


def quoted_in_the_docs() -> dict[str, str]:
    """event → the first file quoting it."""
    found: dict[str, str] = {}
    for path in DOCS:
        for name in _EVENT.findall(path.read_text(encoding="utf-8")):
            if not _NOT_EVENTS.search(name):
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def test_the_docs_quote_log_events() -> None:
    assert len(quoted_in_the_docs()) > 30, "is the scan still finding them?"


def test_every_log_event_the_docs_quote_is_logged_by_the_code() -> None:
    code = strings_in_the_code()
    missing = {name: where for name, where in quoted_in_the_docs().items() if name not in code}
    assert missing == {}
