"""A three-node nats-server cluster on loopback, for what a single server does otherwise
than the replicated streams of production (``WECOMBOT_STREAM_REPLICAS=3``): a clustered
stream checks an append's ``Nats-Msg-Id`` before its expected sequence, for one.

    cluster = NatsCluster(tmp_path); cluster.start()
    nc = await nats.connect(cluster.urls)
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port
from wecombot_common.embedded import nats_server_binary

__all__ = ["NatsCluster"]

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NatsCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        self.ports = [free_port() for _ in range(size)]
        self._routes = [free_port() for _ in range(size)]
        self._monitors = [free_port() for _ in range(size)]
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{port}" for port in self.ports]

    def start(self, timeout: float = 30.0) -> None:
        """Start every node; return once each says it is healthy, JetStream included (a
        meta leader elected)."""
        for i in range(self.size):
            node = self.root / f"n{i}"
            node.mkdir(parents=True, exist_ok=True)
            routes = ", ".join(
                f"nats-route://127.0.0.1:{port}" for j, port in enumerate(self._routes) if j != i
            )
            config = node / "nats.conf"
            config.write_text(
                f'server_name: "n{i}"\n'
                f"listen: 127.0.0.1:{self.ports[i]}\n"
                f"http: 127.0.0.1:{self._monitors[i]}\n"
                f'jetstream {{ store_dir: "{node / "js"}" }}\n'
                f"cluster {{ name: wecombot-test, listen: 127.0.0.1:{self._routes[i]}, "
                f"routes: [{routes}] }}\n"
            )
            with open(node / "nats.log", "ab") as log:
                self._processes.append(
                    subprocess.Popen(
                        [nats_server_binary(), "-c", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + timeout
        while not all(self._healthy(port) for port in self._monitors):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the cluster was not healthy within {timeout:g}s")
            time.sleep(0.1)

    @staticmethod
    def _healthy(monitor: int) -> bool:
        try:
            with _DIRECT.open(f"http://127.0.0.1:{monitor}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
