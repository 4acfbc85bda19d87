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
_MARKERS = (b"wecombot", b"nats-server")  # what our processes' command lines contain
_SERVICES_STOP_S = 10.0
_NATS_STOP_S = 5.0


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self._lock_path = data_dir / "dev.lock"
        self._pids_path = data_dir / "dev.pids"
        self._file: TextIO | None = None
        self._started: list[tuple[str, int]] = []

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
        """Write down a process this ``dev`` started."""
        self._started.append((name, pid))
        text = "".join(f"{pid} {name}\n" for name, pid in self._started)
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
        left = [(name, pid) for name, pid in _parse(lines) if _ours_and_alive(pid)]
        self._pids_path.unlink(missing_ok=True)
        if not left:
            return 0
        names = ", ".join(f"{name} ({pid})" for name, pid in left)
        say(f"a wecombot dev that was killed left these running; stopping them: {names}")
        services = [pid for name, pid in left if name != NATS_SERVER]
        servers = [pid for name, pid in left if name == NATS_SERVER]
        _terminate(services, _SERVICES_STOP_S)
        _terminate(servers, _NATS_STOP_S)
        return len(left)

    def release(self) -> None:
        """Everything this ``dev`` started has stopped: forget it, free the directory."""
        self._pids_path.unlink(missing_ok=True)
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def _parse(lines: list[str]) -> list[tuple[str, int]]:
    out = []
    for line in lines:
        pid, _, name = line.strip().partition(" ")
        if pid.isdigit():
            out.append((name, int(pid)))
    return out


def _ours_and_alive(pid: int) -> bool:
    """Still running, and still one of ours (not another program given a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone (or no /proc here: then it cannot be told, so it is left alone)
        return False
    return any(marker in cmdline for marker in _MARKERS)


def _terminate(pids: list[int], budget_s: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + budget_s
    # Not our children (their parent is gone): no wait() to block on, so poll.
    while any(_ours_and_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _ours_and_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
