"""The sender's integration harness: a real nats-server, the real token service in
process, the simulated WeCom API on loopback, and the log watched as it is appended.
The fixtures (``sim``, ``system``) are in this package's conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict, TypeVar

import httpx
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tests.waiting import until
from wecombot_common import topology
from wecombot_common.bus import append_event, read_conversation
from wecombot_common.events import (
    ConversationReset,
    DeliveryFailed,
    Event,
    Outcome,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    ReplyRequeued,
    decode_event,
    derived_id,
)
from wecombot_common.settings import Secret, WeComApiSettings
from wecombot_common.sim.wecom_api import SimulatedWeComApi
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import Delivery, Lease
from wecombot_sender.main import serve as serve_sender
from wecombot_sender.settings import SenderSettings
from wecombot_sender.wecom import HttpMessageApi
from wecombot_token.main import serve as serve_token
from wecombot_token.settings import TokenSettings

__all__ = [
    "AGENT",
    "APP",
    "CORP",
    "LONG",
    "SECRET",
    "Envelope",
    "Log",
    "StaticTokens",
    "System",
    "delivery_of",
    "environ",
    "message_api",
    "sim_token",
]

E = TypeVar("E", bound=Event)


class Envelope(TypedDict):
    app: str
    conversation: str
    correlation_id: str


CORP, AGENT, SECRET = "wwsim", 1000002, "sim-secret-0123456789"
APP = f"{CORP}-{AGENT}"

# ~5.5 KB of Chinese, ASCII, emoji and a code block: three parts at least
LONG = (
    "# 关于事件溯源\n\n"
    + "事件溯源把每一次变化记录为不可变的事件。Event sourcing keeps every change. " * 30
    + "\n\n```python\n"
    + "".join(f"state = apply(state, event_{i})  # 折叠 🙂\n" for i in range(40))
    + "```\n\n"
    + "最后，状态只是事件的折叠；日志才是真相！The log is the truth. 🎉" * 25
)


def environ(nats_url: str, sim: SimulatedWeComApi, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": nats_url,
        "WECOM_CORP_ID": CORP,
        "WECOM_AGENT_ID": str(AGENT),
        "WECOM_SECRET": SECRET,
        "WECOM_API_BASE": sim.base_url,
        "WECOMBOT_HEALTH_PORT": "0",
        "LOG_LEVEL": "warning",
        **extra,
    }


async def sim_token(sim: SimulatedWeComApi) -> str:
    """An access_token of the simulated WeCom, as gettoken issues it."""
    async with httpx.AsyncClient() as http:
        answer = await http.get(
            f"{sim.base_url}/cgi-bin/gettoken", params={"corpid": CORP, "corpsecret": SECRET}
        )
    return str(answer.json()["access_token"])


def message_api(sim: SimulatedWeComApi, timeout_s: float = 2.0) -> HttpMessageApi:
    """The real message/send adapter, pointed at the simulated WeCom (close it after)."""
    return HttpMessageApi(
        WeComApiSettings(CORP, AGENT, Secret(""), sim.base_url), timeout_s=timeout_s
    )


class StaticTokens:
    """A TokenSource that always has ``token`` (for a ReplySender run by hand)."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get(self, app: str) -> str:
        return self.token

    async def invalidate(self, app: str, token: str) -> str:
        return self.token


def delivery_of(
    event: Outcome | ReplyRequeued,
    stream_seq: int,
    *,
    num_delivered: int = 1,
    lease: Lease | None = None,
) -> Delivery:
    """The worker's delivery of ``event``, for a ReplySender's ``handle`` run by hand."""
    return Delivery(
        event=event,
        stream_seq=stream_seq,
        num_delivered=num_delivered,
        subject=f"{ConversationRef(event.app, event.conversation).root}.llm.reply",
        msg=None,  # type: ignore[arg-type]  # the handler never touches it
        lease=lease or Lease(30.0),
    )


class Log:
    """Every conversation event as the stream stores it (an ordered consumer, so an
    append JetStream refused or dropped as a duplicate never shows here), with a wait
    that wakes on each new event."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()

    async def start(self, js: JetStreamContext) -> None:
        await js.subscribe(
            topology.CONVERSATION_SUBJECTS, cb=self._on_message, ordered_consumer=True
        )

    async def _on_message(self, msg: Msg) -> None:
        async with self._changed:
            self.events.append(decode_event(msg.data))
            self._changed.notify_all()

    def of(self, kind: type[E], reply_id: str | None = None) -> list[E]:
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (reply_id is None or getattr(e, "reply_id", None) == reply_id)
        ]

    def finished(self, reply_id: str) -> bool:
        return bool(self.of(ReplyDelivered, reply_id) or self.of(DeliveryFailed, reply_id))

    async def until(self, check: Callable[[], bool], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(check)

    async def until_finished(self, *reply_ids: str, timeout: float = 15.0) -> None:
        await self.until(lambda: all(self.finished(r) for r in reply_ids), timeout)


@dataclass
class System:
    nc: NATS
    js: JetStreamContext
    sim: SimulatedWeComApi
    log: Log
    url: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start_token(self, **extra: str) -> None:
        settings = TokenSettings.from_env(environ(self.url, self.sim, **extra))
        self.tasks.append(asyncio.create_task(serve_token(settings, self.stop)))
        await until_answering(self.nc, f"$SRV.PING.{topology.TOKEN_SERVICE}")

    def start_sender(self, **extra: str) -> None:
        settings = SenderSettings.from_env(environ(self.url, self.sim, **extra))
        self.tasks.append(asyncio.create_task(serve_sender(settings, self.stop)))

    async def shutdown(self) -> None:
        self.stop.set()
        async with asyncio.timeout(30):
            codes = await asyncio.gather(*self.tasks)
        self.tasks.clear()
        assert all(code in (None, 0) for code in codes), f"a service exited with {codes}"
        self.stop = asyncio.Event()

    async def other_replica(self) -> JetStreamContext.PullSubscription:
        """Another sender's hold on the sender consumer (the same config as the service's),
        for a test to fetch outcomes with and keep or drop them as a replica would."""
        settings = SenderSettings.from_env({"WECOM_CORP_ID": CORP, "WECOM_AGENT_ID": str(AGENT)})
        config = topology.work_consumer(
            topology.SENDER_CONSUMER,
            topology.OUTCOME_FILTER,
            ack_wait_s=settings.ack_wait_s,
            max_ack_pending=10_000,
        )
        await self.js.add_consumer(topology.CONVERSATION_STREAM, config)
        return await self.js.pull_subscribe_bind(
            durable=topology.SENDER_CONSUMER, stream=topology.CONVERSATION_STREAM
        )

    async def deliver_once_and_drop(self, count: int) -> None:
        """Play a sender that fetched ``count`` outcomes and died before acking them: the
        next delivery of each is a redelivery (num_delivered 2)."""
        sub = await self.other_replica()
        msgs = await sub.fetch(count, timeout=5)
        assert len(msgs) == count
        for msg in msgs:
            await msg.nak()
        await sub.unsubscribe()

    async def reply(self, user: str, text: str, kind: type[Outcome] = ReplyGenerated) -> Outcome:
        base = Envelope(app=APP, conversation=user, correlation_id=f"msg-{user}-{len(text)}")
        event: Outcome
        if kind is ReplyFailed:
            event = ReplyFailed(**base, reason="model timed out", attempts=3, text=text)
        elif kind is ConversationReset:
            event = ConversationReset(**base, text=text)
        else:
            event = ReplyGenerated(**base, text=text)
        await append_event(self.js, event, msg_id=f"outcome:{event.event_id}")
        return event

    async def record_first_part(
        self, reply: Outcome, total: int, wecom_msgid: str, span: tuple[int, int] | None = None
    ) -> None:
        """Append part 0's PartDelivered as a sender that then crashed would have (one
        from before spans were recorded, unless ``span`` is given)."""
        conv = ConversationRef(APP, reply.conversation)
        await append_event(
            self.js,
            PartDelivered(
                event_id=derived_id(reply.event_id, "part", "0"),
                app=APP,
                conversation=reply.conversation,
                causation_id=reply.event_id,
                correlation_id=reply.correlation_id,
                reply_id=reply.event_id,
                index=0,
                total=total,
                wecom_msgid=wecom_msgid,
                start=None if span is None else span[0],
                end=None if span is None else span[1],
            ),
            msg_id=f"part:{reply.event_id}:0",
            expect_last_seq=0,
            expect_scope=conv.sender_branch,
        )

    async def history(self, user: str) -> list[Event]:
        return [s.event async for s in read_conversation(self.js, ConversationRef(APP, user))]


async def until_answering(nc: NATS, subject: str) -> None:
    """Wait until a service answers its PING (it has subscribed)."""

    async def answers() -> bool:
        try:
            await nc.request(subject, b"", timeout=0.5)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        return True

    await until(answers, timeout=10, what=f"an answer on {subject}", interval=0.02)
