"""`wecombot dev` as a child process, for the tests that drive it as a user would
(tests/e2e/test_dev.py, tests/browser): a bare environment, its output collected, and a
SIGTERM or Ctrl-C stop under a deadline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["DevProcess", "Output"]


class Output:
    """Collects a child's output lines on a thread; waits for a pattern with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "".join(self.lines[-40:])
                    raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n{tail}")
                self._cond.wait(remaining)

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "".join(self.lines[-n:])


class DevProcess:
    """``python -m wecombot dev`` in ``workdir`` with no WeCom, model or NATS settings
    (so: sandbox mode, offline model, embedded nats-server) plus ``env``."""

    def __init__(self, workdir: Path, **env: str) -> None:
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("WECOM_", "OPENAI_", "NATS_"))
        }
        base.update(WECOMBOT_DATA_DIR=str(workdir / "data"), LOG_FORMAT="json", **env)
        self.data_dir = workdir / "data"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wecombot", "dev"],
            cwd=workdir,
            env=base,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a shell gives a command
        )
        self.out = Output(self.proc)

    def ended(self, timeout: float = 30.0) -> int:
        """The exit code of a dev that ends by itself (a refused start, a lost broker).
        Still running after ``timeout``: stopped, and AssertionError (with the output's
        tail)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"dev did not end in {timeout}s:\n{self.out.tail()}") from None

    def stop(self, timeout: float = 10.0, *, group_signal: signal.Signals | None = None) -> int:
        """SIGTERM (as Kubernetes or ``kill`` would), or ``group_signal`` to the whole
        process group (a terminal's Ctrl-C: SIGINT; the terminal closed: SIGHUP); the exit
        code. Still running after ``timeout``: killed, and AssertionError (with the
        output's tail)."""
        if group_signal is not None:
            os.killpg(self.proc.pid, group_signal)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(
                f"wecombot dev still running {timeout:g}s after SIGTERM (killed):\n"
                f"{self.out.tail()}"
            ) from exc
