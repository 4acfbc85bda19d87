"""`make install` (and everything that depends on it: run, test) with a Python older than
3.11: said in words before pip would fail with "No matching distribution", and a venv
such a Python made is made again rather than kept for good."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A python3.10 as far as the Makefile asks: its version check fails, -V names it.
OLD_PYTHON = """#!/bin/sh
case "$*" in *version_info*) exit 1;; -V|--version) echo "Python 3.10.13"; exit 0;; esac
exit 1
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    old = tmp_path / "python3.10"
    old.write_text(OLD_PYTHON)
    old.chmod(0o755)
    return tmp_path


def make(checkout: Path, goal: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", goal, f"PYTHON={checkout / 'python3.10'}"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_old_python_is_named_before_anything_is_installed(checkout: Path) -> None:
    done = make(checkout, "run")
    assert done.returncode != 0
    assert "wecombot needs Python 3.11 or later" in done.stderr
    assert "is Python 3.10.13" in done.stderr
    assert "make run PYTHON=python3.12" in done.stderr
    assert not (checkout / ".venv").exists()


def test_a_venv_an_old_python_made_is_made_again(checkout: Path) -> None:
    bin_ = checkout / ".venv" / "bin"
    bin_.mkdir(parents=True)
    shutil.copy(checkout / "python3.10", bin_ / "python")
    (bin_ / "pip").write_text("#!/bin/sh\nexit 1\n")
    (bin_ / "pip").chmod(0o755)
    done = make(checkout, "install")
    assert ".venv was made with Python 3.10.13, older than 3.11: making it again" in done.stdout
    assert not (checkout / ".venv").exists()
    assert "wecombot needs Python 3.11 or later" in done.stderr  # and so is this PYTHON
