"""One ``wecombot dev`` per data directory, and nothing left running by one that was killed.

The services and the embedded nats-server run in sessions of their own, so that a
terminal's Ctrl-C reaches only ``dev``, which then stops them in order. The price: a
``dev`` killed outright (SIGKILL, an OOM kill) leaves them all running, holding their
ports, and the next ``dev`` would start a second nats-server on the same JetStream
store. So ``dev`` holds a lock on its data directory while it runs, and writes down what
it started; the next one stops what is written down and still running, services first::

    lock = DataDirLock(data_dir)
    if not lock.acquire():
        ...  # another dev runs with this directory: refuse
    lock.stop_leftovers(say)
    lock.record("nats-server", pid)
    ...
    lock.release()
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

__all__ = ["DataDirLock"]

NATS_SERVER = "nats-server"
_SERVICES_STOP_S = 10.0
_NATS_STOP_S = 5.0


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self._lock_path = data_dir / "dev.lock"
        self._pids_path = data_dir / "dev.pids"
        self._file: TextIO | None = None
        self._started: list[tuple[str, int, str]] = []  # name, pid, start time

    def acquire(self) -> bool:
        """Hold the directory; False if another ``dev`` holds it (the lock goes with its
        process, however it ends)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        file = self._lock_path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        return True

    def holder(self) -> str:
        """The pid of the ``dev`` holding the directory, as it wrote it ("?" if unknown)."""
        with contextlib.suppress(OSError):
            return self._lock_path.read_text(encoding="utf-8").strip() or "?"
        return "?"

    def record(self, name: str, pid: int) -> None:
        """Write down a process this ``dev`` started (with its start time, so a pid the
        system has given to another process since is never taken for it)."""
        self._started.append((name, pid, _started_at(pid)))
        text = "".join(f"{pid} {at} {name}\n" for name, pid, at in self._started)
        tmp = self._pids_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self._pids_path)

    def stop_leftovers(self, say: Callable[[str], None]) -> int:
        """Stop what a killed ``dev`` left running (SIGTERM, the services before the
        nats-server they drain into; SIGKILL past a deadline); how many there were."""
        try:
            lines = self._pids_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return 0
        left = [(name, pid, at) for name, pid, at in _parse(lines) if _same(pid, at)]
        if left:
            names = ", ".join(f"{name} ({pid})" for name, pid, _ in left)
            say(f"a wecombot dev that was killed left these running; stopping them: {names}")
            services = [(pid, at) for name, pid, at in left if name != NATS_SERVER]
            servers = [(pid, at) for name, pid, at in left if name == NATS_SERVER]
            _terminate(services, _SERVICES_STOP_S)
            _terminate(servers, _NATS_STOP_S)
        self._pids_path.unlink(missing_ok=True)
        return len(left)

    def release(self) -> None:
        """Everything this ``dev`` started has stopped: forget it, free the directory."""
        self._pids_path.unlink(missing_ok=True)
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def _parse(lines: list[str]) -> list[tuple[str, int, str]]:
    """(name, pid, start time) of each line ``pid start-time name``."""
    out = []
    for line in lines:
        pid, at, name = [*line.strip().split(" ", 2), "", ""][:3]
        if pid.isdigit() and at.isdigit() and name:
            out.append((name, int(pid), at))
    return out


def _started_at(pid: int) -> str:
    """When ``pid`` started, in clock ticks since boot (/proc/<pid>/stat, field 22);
    "0" when it cannot be read (no /proc here: such a record is never acted on)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return "0"
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    if len(fields) <= 19 or fields[0] == "Z":  # a zombie has ended, only not been reaped
        return "0"
    return fields[19]


def _same(pid: int, started_at: str) -> bool:
    """The very process written down is still running (not a recycled pid, not gone)."""
    return started_at != "0" and _started_at(pid) == started_at


def _terminate(processes: list[tuple[int, str]], budget_s: float) -> None:
    for pid, _ in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + budget_s
    # Not our children (their parent is gone): no wait() to block on, so poll.
    while any(_same(pid, at) for pid, at in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, at in processes:
        if _same(pid, at):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
