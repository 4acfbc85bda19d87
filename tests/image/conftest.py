"""Say which base image tests/image built on (the official one or the Debian stand-in)."""

from __future__ import annotations

import pytest

BASES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for description in BASES:
        terminalreporter.write_line(f"tests/image built the Dockerfile on: {description}")
