"""wecombot dev's hold on its data directory, and what it stops of a killed dev's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wecombot.devlock import DataDirLock

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path), DataDirLock(tmp_path)
    assert first.acquire()
    assert not second.acquire()
    assert second.holder() == str(os.getpid())
    first.release()
    assert second.acquire()
    second.release()


def test_only_the_very_processes_written_down_are_stopped(tmp_path: Path) -> None:
    said: list[str] = []
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed = DataDirLock(tmp_path)
    try:
        assert killed.acquire()
        killed.record("llm", left.pid)
        # This very process, as if under a pid recycled since: another start time.
        pids = tmp_path / "dev.pids"
        pids.write_text(pids.read_text() + f"{os.getpid()} 1 token\n")

        # The next dev (the killed one never released: its record stays).
        stopped = DataDirLock(tmp_path).stop_leftovers(said.append)
        assert stopped == 1
        assert left.wait(timeout=15) != 0  # terminated
        assert said and f"llm ({left.pid})" in said[0] and "token" not in said[0]
        assert not pids.exists()
    finally:
        killed.release()
        left.kill()
        left.wait()


def test_a_clean_release_forgets_what_it_started(tmp_path: Path) -> None:
    lock = DataDirLock(tmp_path)
    assert lock.acquire()
    lock.record("token", os.getpid())
    lock.release()
    assert DataDirLock(tmp_path).stop_leftovers(lambda _: None) == 0
