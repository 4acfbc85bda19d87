"""The whole pipeline on loopback, for real: nats-server, the four services, a simulated
WeCom API and a simulated OpenAI-compatible model, and a WeCom client that posts signed,
encrypted callbacks to the gateway.

Services run either in this process (``serve()`` tasks, fast) or as separate OS
processes (``python -m wecombot <service>``, exactly as Kubernetes runs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.waiting import until
from wecombot_common.crypto import generate_encoding_aes_key, generate_token
from wecombot_common.sim.callbacks import Callback, CallbackBuilder
from wecombot_common.sim.openai_api import SimulatedOpenAIApi
from wecombot_common.sim.wecom_api import SimulatedWeComApi

CORP_ID = "wwe2e0123456789"
AGENT_ID = 1000002

# How a service process is started: its argv and environment from ``wecombot`` arguments
# and the stack's settings. tests/image starts them from the built image instead.
Launcher = Callable[[Sequence[str], Mapping[str, str]], tuple[list[str], dict[str, str]]]


# One scrape of GET /metrics: (sample name, its labels) → value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample_key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def samples_of(scrape: str) -> Samples:
    """A Prometheus text scrape, parsed by prometheus_client's own parser."""
    return {
        sample_key(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
    }


def host_python(args: Sequence[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """``python -m wecombot <args>`` from this venv, with this process's environment."""
    return [sys.executable, "-m", "wecombot", *args], {**os.environ, **env}


def own_pid(proc: subprocess.Popen[bytes]) -> int:
    """The started process is the service itself (no launcher wraps it)."""
    return proc.pid


def service(
    name: str,
) -> tuple[Callable[[Mapping[str, str]], Any], Callable[..., Awaitable[None]]]:
    """A service's settings loader and ``serve(settings, stop)``, to run it in process."""
    if name == "gateway":
        from wecombot_gateway.main import serve as gateway_serve
        from wecombot_gateway.settings import GatewaySettings

        return GatewaySettings.from_env, gateway_serve
    if name == "llm":
        from wecombot_llm.main import serve as llm_serve
        from wecombot_llm.settings import LlmSettings

        return LlmSettings.from_env, llm_serve
    if name == "sender":
        from wecombot_sender.main import serve as sender_serve
        from wecombot_sender.settings import SenderSettings

        return SenderSettings.from_env, sender_serve
    from wecombot_token.main import serve as token_serve
    from wecombot_token.settings import TokenSettings

    return TokenSettings.from_env, token_serve


@dataclass
class InProcessService:
    name: str
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def terminate(self, timeout: float = 15.0) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)


@dataclass
class ProcessService:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    # The process SIGTERM is for: the service itself, not a launcher wrapping it.
    service_pid: Callable[[subprocess.Popen[bytes]], int] = own_pid

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(self.service_pid(self.proc), signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


@dataclass
class Stack:
    nats_url: str
    workdir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    wecom: SimulatedWeComApi = field(init=False)
    model: SimulatedOpenAIApi = field(init=False)
    client: CallbackBuilder = field(init=False)
    gateway_port: int = field(default_factory=free_port)
    services: list[InProcessService | ProcessService] = field(default_factory=list)
    http: httpx.AsyncClient = field(init=False)
    launcher: Launcher = host_python
    service_pid: Callable[[subprocess.Popen[bytes]], int] = own_pid

    def __post_init__(self) -> None:
        token = generate_token()
        aes_key = generate_encoding_aes_key()
        self.wecom = SimulatedWeComApi(corp_id=CORP_ID, secret="e2e-corp-secret", agent_id=AGENT_ID)
        self.model = SimulatedOpenAIApi(api_key="sk-e2e-model-key")
        self.client = CallbackBuilder(
            corp_id=CORP_ID, agent_id=AGENT_ID, token=token, encoding_aes_key=aes_key
        )
        self._token = token
        self._aes_key = aes_key

    @property
    def callback_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/wecom/callback"

    def env(self) -> dict[str, str]:
        return {
            "WECOM_CORP_ID": CORP_ID,
            "WECOM_AGENT_ID": str(AGENT_ID),
            "WECOM_SECRET": self.wecom.secret,
            "WECOM_TOKEN": self._token,
            "WECOM_ENCODING_AES_KEY": self._aes_key,
            "WECOM_API_BASE": self.wecom.base_url,
            "OPENAI_API_KEY": "sk-e2e-model-key",
            "OPENAI_BASE_URL": self.model.base_url,
            "OPENAI_MODEL": "sim-model",
            "NATS_URL": self.nats_url,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.gateway_port),
            "WECOMBOT_HEALTH_PORT": "0",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            **self.env_extra,
        }

    async def __aenter__(self) -> Stack:
        await self.wecom.start()
        await self.model.start()
        self.http = httpx.AsyncClient(timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        failures: list[BaseException] = []
        for running in reversed(self.services):
            try:
                await running.terminate()
            except Exception as error:  # stop the others first, then fail the test
                failures.append(error)
        await self.http.aclose()
        await self.model.stop()
        await self.wecom.stop()
        if failures and exc[0] is None:
            # An in-process service that crashed, or a service that did not stop within
            # its budget: the test must not pass on the work of the others.
            raise failures[0]

    # ------------------------------------------------------------ services
    async def start_in_process(self, *names: str) -> None:
        env = self.env()
        for name in names:
            load, serve = service(name)
            stop = asyncio.Event()
            task = asyncio.create_task(serve(load(env), stop), name=f"svc-{name}")
            self.services.append(InProcessService(name, stop, task))
        await self.wait_ready()

    def start_process(self, name: str, **extra_env: str) -> ProcessService:
        argv, env = self.launcher([name], {**self.env(), **extra_env})
        log_path = self.workdir / f"{name}-{len(self.services)}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        started = ProcessService(name, proc, log_path, self.service_pid)
        self.services.append(started)
        return started

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """The gateway answers /readyz (NATS connected, stream present)."""

        async def ready() -> bool:
            for s in self.services:
                if isinstance(s, InProcessService) and s.task.done():
                    s.task.result()  # surface a crash
            with contextlib.suppress(httpx.TransportError):
                r = await self.http.get(f"http://127.0.0.1:{self.gateway_port}/readyz")
                return r.status_code == 200
            return False

        await until(ready, timeout=timeout, what="the gateway ready")

    # ------------------------------------------------------------ playing WeCom
    async def post(self, callback: Callback) -> httpx.Response:
        return await self.http.post(
            self.callback_url,
            params=callback.query,
            content=callback.body,
            headers={"Content-Type": "text/xml"},
        )

    async def say(self, user: str, text: str) -> Callback:
        """A user sends a text message; WeCom posts it until it gets a 200."""
        callback = self.client.text(user, text)
        for _ in range(50):
            response = await self.post(callback)
            if response.status_code == 200:
                return callback
            assert response.status_code == 503, response.text
            await asyncio.sleep(0.1)  # WeCom's retry interval (it retries on non-200)
        raise AssertionError(f"gateway never accepted {text!r}")

    def replies(self, user: str) -> list[str]:
        return self.wecom.messages_to(user)

    async def wait_replies(self, user: str, count: int, timeout: float = 30.0) -> list[str]:
        await until(
            lambda: len(self.replies(user)) >= count,
            timeout=timeout,
            what=lambda: f"{count} replies to {user} (have {self.replies(user)})",
        )
        return self.replies(user)
