"""The token service's settings, read from the environment once at start-up.

>>> s = TokenSettings.from_env({
...     "WECOM_CORP_ID": "ww1436e0e65a779aee", "WECOM_AGENT_ID": "1000002",
...     "WECOM_SECRET": "s3cret-from-the-console"})
>>> s.app, s.refresh_margin_s, s.http_timeout_s, s.max_backoff_s, s.health_port
('ww1436e0e65a779aee-1000002', 300.0, 10.0, 300.0, 8083)

Variables (besides the shared WECOM_CORP_ID, WECOM_AGENT_ID, WECOM_SECRET,
WECOM_API_BASE, NATS_*, LOG_*):

``TOKEN_REFRESH_MARGIN`` (300 s: refresh this long before expiry, callers keep getting the
current token meanwhile), ``TOKEN_HTTP_TIMEOUT`` (10 s, at most 12: one gettoken call, all
included), ``TOKEN_MIN_BACKOFF`` (1 s) and ``TOKEN_MAX_BACKOFF`` (300 s: after a failed gettoken
nobody calls WeCom again for min·2ⁿ⁻¹ seconds, capped; the same wait separates replacements
of tokens WeCom rejects in a row, see ``domain.refetch_at``), ``WECOMBOT_HEALTH_PORT`` (8083;
0 turns /healthz and /readyz off).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from wecombot_common.settings import (
    HEALTH_HOST,
    EnvReader,
    LogSettings,
    NatsSettings,
    Secret,
    WeComApiSettings,
    health_host,
    health_port,
    proxy_secrets,
)

from .domain import Policy, credentials_of

__all__ = ["LOCK_SLACK_S", "TokenSettings"]

# A refresh holds the cluster lock for the HTTP timeout plus this (KV reads and writes).
LOCK_SLACK_S = 2.0


@dataclass(frozen=True)
class TokenSettings:
    wecom: WeComApiSettings
    nats: NatsSettings
    log: LogSettings
    health_host: str = HEALTH_HOST
    health_port: int = 8083
    refresh_margin_s: float = 300.0
    http_timeout_s: float = 10.0
    min_backoff_s: float = 1.0
    max_backoff_s: float = 300.0

    @property
    def app(self) -> str:
        """The one app key (``{corp_id}-{agent_id}``) this service holds tokens for."""
        return self.wecom.app

    @property
    def refresh_timeout_s(self) -> float:
        """The longest one refresh may take; a lock older than this is taken over."""
        return self.http_timeout_s + LOCK_SLACK_S

    @property
    def policy(self) -> Policy:
        return Policy(
            refresh_margin_s=self.refresh_margin_s,
            min_backoff_s=self.min_backoff_s,
            max_backoff_s=self.max_backoff_s,
            credentials=credentials_of(self.wecom.corp_id, self.wecom.secret.reveal()),
        )

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Values the log pipeline must redact wherever they appear."""
        return (self.wecom.secret, *proxy_secrets(self.wecom.proxy), *self.nats.secrets)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TokenSettings:
        """Read and validate every variable; raise ConfigError naming each bad one."""
        env = EnvReader(environ)
        wecom = WeComApiSettings.read(env)
        nats = NatsSettings.read(env)
        log = LogSettings.read(env)
        host = health_host(env)
        port = health_port(env, cls.health_port)
        margin = env.seconds("TOKEN_REFRESH_MARGIN", cls.refresh_margin_s, minimum=0, maximum=3600)
        # At most 12 s: the service may wait out a crashed holder's lock and then refresh
        # itself, 2 × (timeout + 2 s), which must stay under the callers' 30 s
        # (tokens.DEFAULT_TIMEOUT_S), or a caller gives up while its token is on the way.
        timeout = env.seconds("TOKEN_HTTP_TIMEOUT", cls.http_timeout_s, minimum=0.5, maximum=12)
        low = env.seconds("TOKEN_MIN_BACKOFF", cls.min_backoff_s, minimum=0.05, maximum=3600)
        high = env.seconds("TOKEN_MAX_BACKOFF", cls.max_backoff_s, minimum=1, maximum=86400)
        env.check(
            low <= high,
            f"TOKEN_MIN_BACKOFF ({low:g}) must not exceed TOKEN_MAX_BACKOFF ({high:g})",
        )
        env.raise_if_invalid()
        settings = cls(
            wecom=wecom,
            nats=nats,
            log=log,
            health_host=host,
            health_port=port,
            refresh_margin_s=margin,
            http_timeout_s=timeout,
            min_backoff_s=low,
            max_backoff_s=high,
        )
        # configure_logging registers these, so the secret is redacted from every line.
        return replace(settings, log=replace(log, extra_secrets=settings.secrets))
