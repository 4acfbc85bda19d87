"""The embedded nats-server (``wecombot dev``, the test fixtures) on a developer's machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_START = """
import sys
from pathlib import Path
from wecombot_common.embedded import EmbeddedNats
server = EmbeddedNats(Path(sys.argv[1]))
server.start(timeout=20)
print("ready", server.url, flush=True)
server.stop()
"""


def test_it_starts_with_an_http_proxy_set(tmp_path: Path) -> None:
    """The readiness probe goes to the server's loopback monitoring port directly: urllib
    sent it to HTTP_PROXY (here a port nothing listens on), so the server never became
    ready for anyone whose shell sets a proxy for the model calls."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy")}
    env |= {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    started = subprocess.run(
        [sys.executable, "-c", _START, str(tmp_path / "store")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("ready nats://127.0.0.1:")


def test_whoever_starts_it_learns_its_pid_before_it_is_ready(tmp_path: Path) -> None:
    """``wecombot dev`` records the pid to stop a leftover server later: recorded only
    once ready, a dev killed during those seconds left a server nobody knew of."""
    from wecombot_common.embedded import EmbeddedNats

    server = EmbeddedNats(tmp_path / "store")
    seen: list[tuple[int, int | None]] = []
    server.start(timeout=20, on_spawn=lambda pid: seen.append((pid, server.client_port)))
    try:
        assert server.process is not None
        assert seen == [(server.process.pid, None)]  # handed over before the ready wait
        assert server.client_port is not None
    finally:
        server.stop()
