"""`wecombot dev` (what `make run` starts) on a bare machine: no settings at all.

It must start its own nats-server, run in sandbox mode with the offline model, carry a
signed, encrypted callback all the way to (simulated) message/send, and stop cleanly
within 10 s on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from wecombot_common.sim.callbacks import CallbackBuilder

pytestmark = pytest.mark.e2e


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


def test_dev_runs_the_whole_system_with_no_settings(tmp_path: Path) -> None:
    gateway_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WECOM_", "OPENAI_", "NATS_"))}
    env.update(
        WECOMBOT_DATA_DIR=str(tmp_path / "data"),
        GATEWAY_PORT=str(gateway_port),
        WECOMBOT_HEALTH_PORT="0",
        LOG_FORMAT="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "wecombot", "dev"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    try:
        out.wait_for(r"SANDBOX MODE")
        out.wait_for(r"OFFLINE model")
        out.wait_for(r"gateway callback URL")
        sandbox = json.loads((tmp_path / "data" / "sandbox.json").read_text())
        wecom = CallbackBuilder(
            corp_id=sandbox["corp_id"],
            agent_id=sandbox["agent_id"],
            token=sandbox["token"],
            encoding_aes_key=sandbox["encoding_aes_key"],
        )
        url = f"http://127.0.0.1:{gateway_port}/wecom/callback"
        deadline = time.monotonic() + 30
        while True:  # the gateway may still be connecting: WeCom would retry too
            try:
                if httpx.get(f"http://127.0.0.1:{gateway_port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.1)
        check = wecom.verify_url("1616140317555161061")
        assert httpx.get(url, params=check).text == "1616140317555161061"
        callback = wecom.text("zhang.san", "hello from the sandbox")
        response = httpx.post(
            url, params=callback.query, content=callback.body, headers={"Content-Type": "text/xml"}
        )
        assert response.status_code == 200
        assert response.text == ""
        out.wait_for(r"message/send → zhang\.san: .*hello from the sandbox", timeout=30)
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert time.monotonic() - started < 10
    assert code == 0
    out.wait_for(r"\[dev\]\s+stopped")
