"""Processes of a benchmark run: broker, services, fakes, load generator, profiler.

Every process is started here and stopped by its own pid (SIGTERM, then SIGKILL after a
deadline); logs go to the run's work directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from wecombot_common.crypto import generate_encoding_aes_key, generate_token
from wecombot_common.embedded import EmbeddedNats
from wecombot_common.settings import app_key
from wecombot_common.topology import OUTCOME_FILTER

__all__ = [
    "Callgrind",
    "Fakes",
    "OutcomeWatch",
    "Profiler",
    "Service",
    "Stack",
    "WeComApp",
    "cpu_s",
    "free_port",
    "rss_mb",
    "run_loadgen",
]

_FOREIGN_ENV = ("WECOM", "OPENAI", "LLM_", "SENDER_", "TOKEN_", "GATEWAY_", "NATS_", "LOG_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass(frozen=True)
class WeComApp:
    """The WeCom app the whole run plays: ids and secrets, generated per run."""

    corp_id: str = "wwbench0123456789"
    agent_id: int = 1000002
    secret: str = field(default_factory=generate_token)
    token: str = field(default_factory=generate_token)
    aes_key: str = field(default_factory=generate_encoding_aes_key)

    @property
    def app(self) -> str:
        return app_key(self.corp_id, self.agent_id)

    def loadgen(self) -> dict[str, Any]:
        return {
            "corp_id": self.corp_id,
            "agent_id": self.agent_id,
            "token": self.token,
            "aes_key": self.aes_key,
        }


async def wait_http(
    url: str, *, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready after {timeout:g}s")
            await asyncio.sleep(0.05)


class Service:
    """One ``python -m <module> …`` child process with a log file, a health URL and the
    port it serves HTTP on (None: none of ours to know). ``launcher`` runs the
    interpreter under another program (:meth:`Callgrind.launcher`); the process is then
    that program's, which runs Python in the same pid."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        log: Path,
        health: str | None,
        port: int | None = None,
        *,
        launcher: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.health = health
        self.port = port
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [*launcher, sys.executable, *argv],
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    async def ready(self, timeout: float = 30.0) -> None:
        if self.health is not None:
            await wait_http(self.health, timeout=timeout, proc=self.proc)

    async def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


class Callgrind:
    """Instructions a process executes, counted by valgrind's callgrind.

    A count, not a time: the same for the same work whatever else the machine is doing,
    so it tells an instruction apart from a cache miss (``bench.scenarios.instructions``).
    Python under callgrind runs ~50x slower, so only a few hundred requests are counted.
    A process starts with callgrind's instrumentation off (its start-up, imports mostly,
    runs ≈ 5x faster so) and has it switched on before its warm-up::

        grind = Callgrind(workdir)
        service = Service(..., launcher=grind.launcher("gateway"))
        await grind.instrument(service)  # once it is ready
        ...                              # its warm-up
        await grind.zero(service)
        ...                         # the work to count
        instructions = await grind.dump(service)
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    @staticmethod
    def missing() -> str | None:
        """Why callgrind cannot run here (None: it can)."""
        absent = [c for c in ("valgrind", "callgrind_control") if shutil.which(c) is None]
        return f"{' and '.join(absent)} not installed" if absent else None

    def launcher(self, name: str) -> list[str]:
        return [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={self._out(name)}",
        ]

    async def instrument(self, service: Service) -> None:
        """Switch instrumentation on: what ``service`` executes from now on is counted."""
        await self._control("--instr=on", service)

    async def zero(self, service: Service) -> None:
        """Forget what ``service`` executed so far."""
        await self._control("--zero", service)

    async def dump(self, service: Service, timeout: float = 60.0) -> int:
        """Instructions ``service`` executed since the last :meth:`zero`."""
        before = set(self._dumps(service))
        await self._control("--dump", service)
        deadline = time.monotonic() + timeout
        while True:
            for path in set(self._dumps(service)) - before:
                for line in path.read_text(errors="replace").splitlines():
                    if line.startswith("summary:"):
                        return int(line.split()[1])
            if time.monotonic() > deadline:
                raise RuntimeError(f"callgrind wrote no dump for {service.name}")
            await asyncio.sleep(0.1)

    def _out(self, name: str) -> Path:
        return self.workdir / f"{name}.callgrind"

    def _dumps(self, service: Service) -> list[Path]:
        return list(self.workdir.glob(f"{self._out(service.name).name}.*"))

    async def _control(self, command: str, service: Service) -> None:
        proc = await asyncio.create_subprocess_exec(
            "callgrind_control", command, str(service.pid),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"callgrind_control {command} {service.name}: {out.decode()}")


class Fakes:
    """The fake WeCom API and model process (``bench.fakes``) and its control API."""

    def __init__(self, app: WeComApp, workdir: Path) -> None:
        ports = workdir / "fakes.ports.json"
        self.service = Service(
            "fakes",
            [
                "-m", "bench.fakes",
                "--corp-id", app.corp_id,
                "--agent-id", str(app.agent_id),
                "--secret", app.secret,
                "--ports-file", str(ports),
            ],
            os.environ,
            workdir / "fakes.log",
            None,
        )  # fmt: skip
        self._ports_file = ports
        self.wecom_url = ""
        self.model_url = ""
        self._control = ""

    async def start(self) -> None:
        deadline = time.monotonic() + 30
        while not self._ports_file.exists():
            if self.service.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("bench.fakes did not start (see fakes.log)")
            await asyncio.sleep(0.05)
        ports = json.loads(self._ports_file.read_text())
        self.wecom_url = ports["wecom"]
        self.model_url = ports["model"]
        self._control = f"http://127.0.0.1:{ports['control']}"

    async def stats(self, *, sent: bool = False) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            url = f"{self._control}/stats" + ("?sent=1" if sent else "")
            async with s.get(url) as r:
                data: dict[str, Any] = await r.json()
                return data

    async def reset(self, *, model_latency: float = 0.0) -> None:
        async with aiohttp.ClientSession() as s:
            url = f"{self._control}/reset?latency={model_latency}"
            async with s.post(url) as r:
                r.raise_for_status()

    async def stop(self) -> None:
        await self.service.stop(5)


class Stack:
    """A fresh nats-server and the wecombot services of one scenario."""

    def __init__(self, workdir: Path, app: WeComApp, fakes: Fakes, *, loop: str) -> None:
        self.workdir = workdir
        self.app = app
        self.fakes = fakes
        self.loop = loop
        self.nats = EmbeddedNats(workdir / "nats", log_file=workdir / "nats.log")
        self.services: list[Service] = []

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
        return {
            **base,
            "WECOM_CORP_ID": self.app.corp_id,
            "WECOM_AGENT_ID": str(self.app.agent_id),
            "WECOM_SECRET": self.app.secret,
            "WECOM_TOKEN": self.app.token,
            "WECOM_ENCODING_AES_KEY": self.app.aes_key,
            "WECOM_API_BASE": self.fakes.wecom_url,
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": self.fakes.model_url,
            "OPENAI_MODEL": "bench-model",
            "NATS_URL": self.nats.url,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            "WECOMBOT_EVENT_LOOP": self.loop,
            **extra,
        }

    async def start_nats(self) -> None:
        await asyncio.to_thread(self.nats.start)

    def start(self, name: str, *, launcher: Sequence[str] = (), **extra: str) -> Service:
        port = free_port()
        if name == "gateway":
            extra = {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), **extra}
        else:
            extra = {"WECOMBOT_HEALTH_PORT": str(port), **extra}
        index = sum(1 for s in self.services if s.name == name)
        service = Service(
            name,
            ["-m", "wecombot", name],
            self.env(**extra),
            self.workdir / f"{name}-{index}.log",
            f"http://127.0.0.1:{port}/readyz",
            port,
            launcher=launcher,
        )
        self.services.append(service)
        return service

    def callback_url(self, server: Service) -> str:
        """Where ``server`` (the gateway, or a ``bench.bare`` baseline) takes callbacks."""
        return f"http://127.0.0.1:{server.port}/wecom/callback"

    async def stop(self) -> None:
        """Stop in dependency order (gateway first, token last), replicas together."""
        for group in ("gateway", "bare", "llm", "sender", "token"):
            await asyncio.gather(*(s.stop() for s in self.services if s.name == group))
        await asyncio.gather(*(s.stop() for s in self.services))  # anything else
        self.services.clear()
        await asyncio.to_thread(self.nats.stop, 5.0)


async def run_loadgen(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run ``bench.loadgen`` in its own process with ``spec``; its JSON result."""
    with open(log, "ab") as err:  # noqa: ASYNC230 (opened once, before the run)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )  # fmt: skip
        out, _ = await proc.communicate(json.dumps(spec).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}); see {log}")
    result: dict[str, Any] = json.loads(out)
    return result


class OutcomeWatch:
    """Counts outcome events (``….llm.>``) as they are appended, with arrival times."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._nc: Any = None

    async def start(self, nats_url: str) -> None:
        import nats

        self._nc = await nats.connect(nats_url)

        async def on_msg(_: Any) -> None:
            self.times.append(time.time())

        await self._nc.subscribe(OUTCOME_FILTER, cb=on_msg)
        await self._nc.flush()

    async def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.times) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def between(self, start: float, end: float) -> int:
        return sum(1 for t in self.times if start <= t < end)

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.close()


class Profiler:
    """py-spy attached to service processes (``--profile DIR``); raw collapsed stacks."""

    def __init__(self, outdir: Path | None) -> None:
        self.outdir = outdir
        self._running: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.outputs: list[Path] = []

    def attach(self, service: Service, label: str) -> None:
        if self.outdir is None:
            return
        exe = shutil.which("py-spy") or str(Path(sysconfig.get_path("scripts")) / "py-spy")
        out = self.outdir / f"{label}.txt"
        proc = subprocess.Popen(
            [exe, "record", "--pid", str(service.pid), "--rate", "200", "--format", "raw",
             "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._running.append((proc, out))

    async def detach(self) -> None:
        for proc, out in self._running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
            if out.exists():
                self.outputs.append(out)
        self._running.clear()
