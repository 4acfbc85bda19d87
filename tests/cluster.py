"""A three-node nats-server cluster on loopback, for what a single server does otherwise
than the replicated streams of production (``WECOMBOT_STREAM_REPLICAS=3``): a clustered
stream checks an append's ``Nats-Msg-Id`` before its expected sequence, for one.

    cluster = NatsCluster(tmp_path); cluster.start()
    nc = await nats.connect(cluster.urls)
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from tests.conftest import free_port
from tests.waiting import until, until_sync
from wecombot_common import topology
from wecombot_common.embedded import nats_server_binary

__all__ = ["NatsCluster", "until_appendable"]

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
        self._processes = [self._spawn(i) for i in range(self.size)]
        self._wait_healthy(range(self.size), timeout)

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
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
            return subprocess.Popen(
                [nats_server_binary(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )

    def _wait_healthy(self, nodes: range | list[int], timeout: float) -> None:
        try:
            until_sync(
                lambda: all(self._healthy(self._monitors[i]) for i in nodes),
                timeout=timeout,
                what=f"nodes {list(nodes)} of the cluster to be healthy",
                interval=0.1,
            )
        except AssertionError:
            self.stop()  # nothing left running
            raise

    def monitor_url(self, i: int) -> str:
        """Node ``i``'s monitoring endpoint (``/connz``, ``/jsz``, ``/healthz``)."""
        return f"http://127.0.0.1:{self._monitors[i]}"

    def stop_node(self, i: int) -> None:
        """SIGTERM node ``i`` (the others keep running) and wait for it to exit."""
        process = self._processes[i]
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def start_node(self, i: int, timeout: float = 30.0) -> None:
        """Start node ``i`` again on its ports and store; return once it is healthy."""
        assert self._processes[i].poll() is not None, f"n{i} is running"
        self._processes[i] = self._spawn(i)
        self._wait_healthy([i], timeout)

    @staticmethod
    def _healthy(monitor: int) -> bool:
        try:
            with _DIRECT.open(f"http://127.0.0.1:{monitor}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()


async def until_appendable(js: JetStreamContext, timeout: float = 30.0) -> None:
    """Until the conversation stream answers an append through ``js``'s server. A fresh
    replicated stream has its leader a moment before the servers route appends to it:
    the first ones meet no responders (seen on CI, 7 ms after the leader). The probe
    expects a last sequence the stream never has, so the stream refuses it: an answer,
    and nothing stored."""
    probe = f"{topology.PREFIX}.conv.probe.probe.in"

    async def answers() -> bool:
        try:
            await js.publish(
                probe, b"", headers={"Nats-Expected-Last-Sequence": str(1 << 62)}, timeout=1.0
            )
        except nats.js.errors.APIError:
            return True  # refused by the stream: it is there to answer
        except (TimeoutError, nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            return False
        raise AssertionError("the stream stored the probe")

    await until(answers, timeout=timeout, what="the replicated stream to answer appends")
