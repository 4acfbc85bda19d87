"""The chaos suite's cluster: real service processes with replicas that a test kills (-9),
restarts and terminates, a WeCom that retries callbacks as WeCom does, and the checks
every scenario ends with.

Everything runs for real on loopback: ``python -m wecombot <service>`` processes (as
Kubernetes runs them), a nats-server with file storage (restartable, same ports and
store), and the simulated WeCom API and model in the test process, where a test can slow
them down, hold a request, fail them or take them down.

The checks (:meth:`Cluster.check`), once the consumers are idle:

- every message a gateway answered 200 is stored, and has exactly one outcome;
- every outcome is delivered (ReplyDelivered) once, each part recorded once;
- each user received exactly the parts of their replies, each once, in the order the
  user spoke (so nothing missing, nothing twice, per-user order kept);
- nothing was dead-lettered (unless the scenario expects it).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from tests.conftest import NatsHandle, free_port
from tests.e2e.harness import AGENT_ID, CORP_ID, ProcessService, Stack
from tests.waiting import until
from wecombot_common import topology
from wecombot_common.events import (
    DeliveryFailed,
    Event,
    EventDecodeError,
    MessageReceived,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    decode_event,
)
from wecombot_common.sim.callbacks import Callback
from wecombot_sender.split import split_text

APP = f"{CORP_ID}-{AGENT_ID}"

# Small ack waits so a killed replica's work moves on within seconds; the rest default.
CHAOS_ENV = {
    "LLM_ACK_WAIT": "3",
    "SENDER_ACK_WAIT": "3",
    "LLM_SHUTDOWN_GRACE": "5",
    "TOKEN_HTTP_TIMEOUT": "2",
    # Users here type faster than the flood gate allows; the suite checks delivery.
    "LLM_USER_RATE_PER_MINUTE": "0",
    "LOG_LEVEL": "info",
}

STARTED = {
    "gateway": "gateway.listening",
    "llm": "llm.started",
    "sender": "sender.started",
    "token": "token.started",
}

LONG_MARK = "#long"


def reply_for(text: str) -> str:
    """What the simulated model answers ``text``: an echo, or a long answer in several
    parts when asked for one. Every part is unique (it names the message), so a part
    delivered twice is always visible."""
    if LONG_MARK not in text:
        return f"echo: {text}"
    paragraph = "事件溯源把每一次变化记录为不可变的事件，状态只是事件的折叠。" * 18
    return "\n\n".join(f"[{text} ¶{i}] {paragraph}" for i in range(5))


def model_reply(messages: list[dict[str, Any]]) -> str:
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    return reply_for(str(users[-1]) if users else "")


@dataclass
class Said:
    user: str
    text: str
    callback: Callback


@dataclass
class Cluster:
    """A :class:`Stack` of processes, with replicas, kills, restarts and the checks."""

    stack: Stack
    nats: NatsHandle
    js: JetStreamContext
    gateway_ports: list[int] = field(default_factory=list)
    ports: dict[int, int] = field(default_factory=dict)  # gateway process pid -> port
    said: list[Said] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)  # gateway answers (0: no answer)
    kills: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stack.model.reply = model_reply
        self._http = httpx.AsyncClient(timeout=5.0)  # WeCom waits 5 s for an answer

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ processes
    @property
    def wecom(self) -> Any:
        return self.stack.wecom

    @property
    def model(self) -> Any:
        return self.stack.model

    def alive(self, name: str | None = None) -> list[ProcessService]:
        return [
            s
            for s in self.stack.services
            if isinstance(s, ProcessService)
            and s.proc.poll() is None
            and (name is None or s.name == name)
        ]

    def exited(self) -> list[ProcessService]:
        """The service processes that have ended (killed, stopped or crashed), in the
        order they were started."""
        return [
            s
            for s in self.stack.services
            if isinstance(s, ProcessService) and s.proc.poll() is not None
        ]

    def start(self, name: str, **env: str) -> ProcessService:
        if name == "gateway":
            port = self.stack.gateway_port if not self.ports else free_port()
            env = {"GATEWAY_PORT": str(port), **env}
        service = self.stack.start_process(name, **env)
        if name == "gateway":
            self.ports[service.proc.pid] = int(env["GATEWAY_PORT"])
            self.gateway_ports.append(int(env["GATEWAY_PORT"]))
        return service

    def retire(self, service: ProcessService) -> None:
        """A gateway leaving: the load balancer stops sending it callbacks."""
        port = self.ports.pop(service.proc.pid, None)
        if port in self.gateway_ports:
            self.gateway_ports.remove(port)

    async def started(self, *services: ProcessService, timeout: float = 60.0) -> None:
        """Until each service logged that it is serving (fails at once if one exits)."""

        def ready() -> bool:
            for s in services:
                if s.proc.poll() is not None:
                    raise AssertionError(f"{s.name} exited with {s.proc.returncode}: {s.log_path}")
            return all(STARTED[s.name] in s.log_path.read_text() for s in services)

        await until(ready, timeout=timeout, what=f"{[s.name for s in services]} to start")

    async def start_all(self, **replicas: int) -> None:
        """Start ``name=count`` replicas of each service and wait until all serve."""
        services = [self.start(name) for name, count in replicas.items() for _ in range(count)]
        await self.started(*services)

    def kill(self, service: ProcessService) -> None:
        service.kill()
        self.kills.append(service.name)

    async def restart(self, service: ProcessService) -> ProcessService:
        """Kill -9 ``service`` and start a new replica of it (a crash, then a reschedule)."""
        self.kill(service)
        fresh = self.start(service.name)
        await self.started(fresh)
        return fresh

    # ------------------------------------------------------------ playing WeCom
    async def post(self, callback: Callback, port: int) -> int:
        try:
            response = await self._http.post(
                f"http://127.0.0.1:{port}/wecom/callback",
                params=callback.query,
                content=callback.body,
                headers={"Content-Type": "text/xml"},
            )
        except httpx.TransportError:
            return 0  # refused, reset or no answer within 5 s: WeCom retries
        return response.status_code

    async def deliver(self, callback: Callback, *, timeout: float = 120.0) -> None:
        """POST ``callback`` until a gateway answers 200, as WeCom does (it retries any
        other answer), trying the gateway replicas in turn (a load balancer would)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt = int(callback.msg_id or 0)  # spreads first tries over the replicas
        while True:
            ports = self.gateway_ports
            status = await self.post(callback, ports[attempt % len(ports)])
            self.statuses[status] += 1
            if status == 200:
                return
            assert status in (0, 503), f"gateway answered {status}"
            attempt += 1
            if loop.time() > deadline:
                raise AssertionError(f"no gateway accepted {callback.msg_id} in {timeout:g}s")
            await asyncio.sleep(0.2)  # WeCom's retry pace (not synchronisation)

    async def say(self, user: str, text: str, callback: Callback | None = None) -> Said:
        """``user`` sends ``text`` (as ``callback`` if given); returns once WeCom has had
        a 200 for it."""
        callback = callback or self.stack.client.text(user, text)
        await self.deliver(callback)
        said = Said(user, text, callback)
        self.said.append(said)
        return said

    async def conversation(self, user: str, texts: Iterable[str]) -> None:
        """One user's messages, each after the previous one was accepted (so the order
        the user spoke in is the order they were stored in)."""
        for text in texts:
            await self.say(user, text)

    # ------------------------------------------------------------ what users saw
    def expected(self) -> dict[str, list[str]]:
        parts: dict[str, list[str]] = defaultdict(list)
        for s in self.said:
            parts[s.user].extend(split_text(reply_for(s.text)))
        return parts

    def received(self) -> dict[str, list[str]]:
        got: dict[str, list[str]] = defaultdict(list)
        for m in self.wecom.sent:
            got[m.touser].append(m.content)
        return got

    async def answered(self, *, timeout: float) -> None:
        """Until every user has at least as many messages as their replies have parts."""
        expected = self.expected()

        def done() -> bool:
            got = self.received()
            return all(len(got[u]) >= len(parts) for u, parts in expected.items())

        def missing() -> str:
            got = self.received()
            short = [(u, len(got[u]), len(p)) for u, p in expected.items() if len(got[u]) < len(p)]
            return f"every reply (user, parts got, parts expected: {short[:5]})"

        await until(done, timeout=timeout, what=missing, interval=0.2)

    async def idle(self, *, timeout: float = 60.0) -> None:
        """Until both work consumers hold nothing (every delivery settled)."""

        async def settled() -> bool:
            for consumer in (topology.LLM_CONSUMER, topology.SENDER_CONSUMER):
                try:
                    info = await self.js.consumer_info(topology.CONVERSATION_STREAM, consumer)
                except (nats.errors.Error, TimeoutError):
                    return False
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await until(settled, timeout=timeout, what="the consumers to settle", interval=0.25)

    # ------------------------------------------------------------ the checks
    async def events(self) -> list[tuple[int, Event]]:
        """Every decodable event in the stream, in order."""
        info = await self.js.stream_info(topology.CONVERSATION_STREAM)
        last = info.state.last_seq
        found: list[tuple[int, Event]] = []
        if not last:
            return found
        sub = await self.js.subscribe(topology.CONVERSATION_SUBJECTS, ordered_consumer=True)
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                seq = msg.metadata.sequence.stream
                with contextlib.suppress(EventDecodeError):
                    found.append((seq, decode_event(msg.data)))
                if seq >= last:
                    return found
        finally:
            await sub.unsubscribe()

    async def dead_letters(self) -> list[dict[str, str]]:
        info = await self.js.stream_info(topology.DEAD_LETTER_STREAM)
        letters: list[dict[str, str]] = []
        if not info.state.messages:
            return letters
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await self.js.get_msg(topology.DEAD_LETTER_STREAM, seq)
                letters.append(dict(msg.headers or {}))
        return letters

    async def check(
        self,
        *,
        timeout: float = 120.0,
        dead_letters: int = 0,
        skip_users: Iterable[str] = (),
        repeats: int = 0,
    ) -> None:
        """Wait for every answer, then check the invariants (see the module doc).
        ``repeats``: how many parts may have reached a user twice in a row (only where
        the broker itself lost state: a single nats-server killed -9)."""
        skipped = set(skip_users)
        await self.answered(timeout=timeout)
        await self.idle()
        expected, received = self.expected(), self.received()
        repeated = 0
        for user, parts in expected.items():
            if user in skipped:
                continue
            got = received[user]
            if repeats:
                once = [p for i, p in enumerate(got) if i == 0 or got[i - 1] != p]
                repeated += len(got) - len(once)
                got = once
            if got != parts:
                raise AssertionError(_difference(user, got, parts))
        assert repeated <= repeats, f"{repeated} parts delivered twice"
        assert not any(m.truncated for m in self.wecom.sent)
        await self._check_log(skipped)
        letters = await self.dead_letters()
        assert len(letters) == dead_letters, letters

    async def _check_log(self, skipped: set[str]) -> None:
        events = [e for _, e in await self.events() if e.conversation not in skipped]
        stored = Counter(e.msg_id for e in events if isinstance(e, MessageReceived))
        for s in self.said:
            if s.user not in skipped:
                assert stored[s.callback.msg_id] == 1, (s.callback.msg_id, s.user)
        received_ids = {e.event_id for e in events if isinstance(e, MessageReceived)}
        outcomes = Counter(
            e.causation_id for e in events if isinstance(e, ReplyGenerated | ReplyFailed)
        )
        assert set(outcomes) == received_ids, "a stored message without exactly one outcome"
        assert max(outcomes.values(), default=1) == 1, outcomes.most_common(3)
        reply_ids = {e.event_id for e in events if isinstance(e, ReplyGenerated | ReplyFailed)}
        done = Counter(e.reply_id for e in events if isinstance(e, ReplyDelivered))
        assert set(done) == reply_ids and max(done.values(), default=1) == 1
        assert not [e for e in events if isinstance(e, DeliveryFailed)]
        parts = Counter((e.reply_id, e.index) for e in events if isinstance(e, PartDelivered))
        assert max(parts.values(), default=1) == 1, parts.most_common(3)

    def logs(self, name: str) -> str:
        return "".join(
            s.log_path.read_text()
            for s in self.stack.services
            if isinstance(s, ProcessService) and s.name == name
        )

    def log_count(self, name: str, event: str) -> int:
        return len(re.findall(rf'"event": "{re.escape(event)}"', self.logs(name)))


def _difference(user: str, got: list[str], expected: list[str]) -> str:
    short = [p[:40] for p in got]
    want = [p[:40] for p in expected]
    twice = [p for p, n in Counter(got).items() if n > 1]
    return (
        f"{user} received {len(got)} parts, expected {len(expected)}; "
        f"twice: {[p[:40] for p in twice]}; got {short}; expected {want}"
    )


@contextlib.asynccontextmanager
async def cluster_of(
    nats_server: NatsHandle, js: JetStreamContext, workdir: Path, **env: str
) -> Any:
    """A cluster on ``nats_server`` (services are started by the test)."""
    async with Stack(nats_server.url, workdir, env_extra={**CHAOS_ENV, **env}) as stack:
        cluster = Cluster(stack, nats_server, js)
        try:
            yield cluster
        finally:
            # Stop what is left in parallel (the stack would, one by one).
            await asyncio.gather(*(s.terminate() for s in cluster.alive()), return_exceptions=True)
            await cluster.aclose()
