"""The sender's settings, read once from the environment at start-up.

    >>> s = SenderSettings.from_env({"WECOM_CORP_ID": "ww1", "WECOM_AGENT_ID": "1000002"})
    >>> s.wecom.app, s.health_port, s.max_concurrency, s.retry_attempts, s.message_type
    ('ww1-1000002', 8082, 32, 4, 'text')

The sender never needs the app Secret: access_tokens come from the token service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from wecombot_common.settings import (
    EnvReader,
    LogSettings,
    NatsSettings,
    WeComApiSettings,
    health_host,
    health_port,
    proxy_secrets,
)

from .domain import RECENT_SENDS_KEPT
from .wecom import MESSAGE_TYPES, MessageType

__all__ = ["SenderSettings"]


@dataclass(frozen=True)
class SenderSettings:
    nats: NatsSettings
    log: LogSettings
    wecom: WeComApiSettings
    health_host: str
    health_port: int
    max_concurrency: int
    http_timeout_s: float
    ack_wait_s: float
    max_deliver: int
    order_wait_s: float
    # in-process retries of one part (after the first try) before handing the message back
    retry_attempts: int
    # WeCom drops a member's messages beyond 30 a minute silently (path/90454); 0 = off
    per_user_per_minute: int
    # ... and beyond 1000 an hour (same page); 0 = off
    per_user_per_hour: int
    # what replies go out as: text, or markdown (WeCom renders a subset; path/90236)
    message_type: MessageType
    cache_mb: int = 64  # the conversations a replica keeps in memory between replies

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SenderSettings:
        env = EnvReader(environ)
        nats = NatsSettings.read(env)
        log = LogSettings.read(env)
        wecom = WeComApiSettings.read(env, need_secret=False)
        settings = cls(
            nats=nats,
            # configure_logging registers these, so they are redacted from every line
            # and WECOM_SECRET: never used here, but held when set (`make run` sets it)
            log=replace(
                log,
                extra_secrets=(
                    *nats.secrets,
                    *proxy_secrets(wecom.proxy),
                    *((wecom.secret,) if wecom.secret else ()),
                ),
            ),
            wecom=wecom,
            health_host=health_host(env),
            health_port=health_port(env, 8082),
            max_concurrency=env.integer("SENDER_MAX_CONCURRENCY", 32, minimum=1, maximum=4096),
            http_timeout_s=env.seconds("SENDER_HTTP_TIMEOUT", 10.0, minimum=0.1, maximum=120.0),
            ack_wait_s=env.seconds("SENDER_ACK_WAIT", 30.0, minimum=1.0, maximum=3600.0),
            max_deliver=env.integer("SENDER_MAX_DELIVER", 20, minimum=1, maximum=10_000),
            order_wait_s=env.seconds("SENDER_ORDER_WAIT", 60.0, minimum=0.0, maximum=3600.0),
            retry_attempts=env.integer("SENDER_RETRY_ATTEMPTS", 4, minimum=0, maximum=100),
            # At most the sends a conversation remembers: a larger limit would never be
            # reached, so it would pace nothing (WeCom's own limit is 30).
            per_user_per_minute=env.integer(
                "SENDER_PER_USER_PER_MINUTE", 30, minimum=0, maximum=RECENT_SENDS_KEPT
            ),
            per_user_per_hour=env.integer("SENDER_PER_USER_PER_HOUR", 1000, minimum=0),
            message_type=_message_type(env),
            cache_mb=env.integer("SENDER_CACHE_MB", 64, minimum=1, maximum=1 << 20),
        )
        env.raise_if_invalid()
        return settings


def _message_type(env: EnvReader) -> MessageType:
    chosen = env.choice("SENDER_MESSAGE_TYPE", "text", MESSAGE_TYPES)
    return "markdown" if chosen == "markdown" else "text"
