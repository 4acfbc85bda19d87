"""The gateway's settings, read from the environment once at start-up.

>>> s = GatewaySettings.from_env({
...     "WECOM_CORP_ID": "ww1436e0e65a779aee", "WECOM_AGENT_ID": "1000002",
...     "WECOM_TOKEN": "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo",
...     "WECOM_ENCODING_AES_KEY": "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"})
>>> s.port, s.callback_path, s.app
(8080, '/wecom/callback', 'ww1436e0e65a779aee-1000002')

Variables (besides the shared WECOM_*, NATS_*, LOG_*):

``GATEWAY_HOST`` (0.0.0.0), ``GATEWAY_PORT`` (8080), ``GATEWAY_CALLBACK_PATH``
(/wecom/callback; a literal path, no ``{}`` pattern, ``%`` escape or ``.``/``..``
segment, and none of the gateway's own /healthz, /readyz, /metrics),
``GATEWAY_TIMESTAMP_WINDOW`` (300 s either side, so at most half of
``WECOMBOT_DUPLICATE_WINDOW``; 0 disables the replay check),
``GATEWAY_MAX_BODY_BYTES`` (1 MiB), ``GATEWAY_BODY_TIMEOUT`` (5 s: a body not received
by then is answered 408 and its connection freed; WeCom gives up after 5 s anyway),
``GATEWAY_KEEPALIVE_TIMEOUT`` (75 s: a connection on which no whole request's headers
arrive for that long is closed, an idle keep-alive one or one whose headers trickle in;
keep it above the idle timeout of the proxy in front, e.g. ingress-nginx's 60 s),
``GATEWAY_REFUSAL_LOG_RATE`` (20: ``callback.rejected`` lines written per second per kind
of refusal, the rest counted in the next line; 0 writes every one),
``GATEWAY_PUBLISH_TIMEOUT`` (2 s: after that the callback is answered 503 and WeCom
retries).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wecombot_common.settings import (
    EnvReader,
    LogSettings,
    NatsSettings,
    Secret,
    WeComCallbackSettings,
)

__all__ = ["DEFAULT_CALLBACK_PATH", "GatewaySettings", "read_callback_path"]

# HealthServer's routes, which the gateway serves on the callback's own port (app.py): a
# callback path equal to one would answer the probes or the Prometheus scrape instead.
_RESERVED_PATHS = ("/healthz", "/readyz", "/metrics")
DEFAULT_CALLBACK_PATH = "/wecom/callback"
# WeCom gives up on a callback after 5 s (https://developer.work.weixin.qq.com/document/path/90238);
# waiting longer for a PubAck only answers a request nobody is listening to any more.
_MAX_PUBLISH_TIMEOUT_S = 4.5


@dataclass(frozen=True)
class GatewaySettings:
    wecom: WeComCallbackSettings
    nats: NatsSettings
    log: LogSettings
    host: str = "0.0.0.0"  # noqa: S104 (a container's listener; the callback is public anyway)
    port: int = 8080
    callback_path: str = DEFAULT_CALLBACK_PATH
    timestamp_window_s: int = 300
    max_body_bytes: int = 1024 * 1024
    publish_timeout_s: float = 2.0
    body_timeout_s: float = 5.0
    keepalive_timeout_s: float = 75.0
    refusal_log_rate: int = 20

    @property
    def app(self) -> str:
        """The app key (``{corp_id}-{agent_id}``) stamped on every event."""
        return self.wecom.app

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Values the log pipeline must redact wherever they appear."""
        return (self.wecom.token, self.wecom.encoding_aes_key, *self.nats.secrets)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GatewaySettings:
        """Read and validate every variable; raise ConfigError naming each bad one."""
        env = EnvReader(environ)
        wecom = WeComCallbackSettings.read(env)
        nats = NatsSettings.read(env)
        log = LogSettings.read(env)
        host = env.text("GATEWAY_HOST", cls.host)
        port = env.integer("GATEWAY_PORT", cls.port, minimum=1, maximum=65535)
        path = read_callback_path(env)
        window = env.integer(
            "GATEWAY_TIMESTAMP_WINDOW", cls.timestamp_window_s, minimum=0, maximum=86400
        )
        max_body = env.integer(
            "GATEWAY_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024, maximum=64 * 1024 * 1024
        )
        publish_timeout = env.seconds(
            "GATEWAY_PUBLISH_TIMEOUT",
            cls.publish_timeout_s,
            minimum=0.05,
            maximum=_MAX_PUBLISH_TIMEOUT_S,
        )
        body_timeout = env.seconds(
            "GATEWAY_BODY_TIMEOUT", cls.body_timeout_s, minimum=0.1, maximum=60
        )
        keepalive_timeout = env.seconds(
            "GATEWAY_KEEPALIVE_TIMEOUT", cls.keepalive_timeout_s, minimum=1, maximum=3600
        )
        refusal_log_rate = env.integer(
            "GATEWAY_REFUSAL_LOG_RATE", cls.refusal_log_rate, minimum=0, maximum=100_000
        )
        if window:
            # A signed callback replayed inside the window is stored again once the log
            # no longer remembers its Nats-Msg-Id: the dedupe must outlast the window, and
            # the window is ± on our clock. A callback that arrived when our clock read its
            # timestamp minus the window (ours behind WeCom's) is accepted replayed until
            # its timestamp plus the window: 2 × the window after the original was stored.
            env.check(
                2 * window <= nats.duplicate_window_s,
                f"twice GATEWAY_TIMESTAMP_WINDOW (2 × {window} s) must not exceed "
                f"WECOMBOT_DUPLICATE_WINDOW ({nats.duplicate_window_s:g} s): the window is ± "
                "our clock, and a replay after the dedupe would be stored again",
            )
        env.raise_if_invalid()
        return cls(
            wecom=wecom,
            nats=nats,
            log=log,
            host=host,
            port=port,
            callback_path=path,
            timestamp_window_s=window,
            max_body_bytes=max_body,
            publish_timeout_s=publish_timeout,
            body_timeout_s=body_timeout,
            keepalive_timeout_s=keepalive_timeout,
            refusal_log_rate=refusal_log_rate,
        )


def read_callback_path(env: EnvReader) -> str:
    """GATEWAY_CALLBACK_PATH, refused unless a request for it reaches the callback route.

    The router matches the *decoded* path, after the client has resolved '.' and '..'
    segments, so '/%6detrics' and '/wecom/./callback' would never be reached. ``wecombot
    doctor`` reads the path with this too.

    >>> env = EnvReader({"GATEWAY_CALLBACK_PATH": "/wecom%2Fcallback"})
    >>> read_callback_path(env), len(env.problems)
    ('/wecom%2Fcallback', 1)
    """
    path = env.text("GATEWAY_CALLBACK_PATH", DEFAULT_CALLBACK_PATH)
    env.check(
        path.startswith("/") and not any(c in "?#" or _blank(c) for c in path),
        "GATEWAY_CALLBACK_PATH must start with '/' and hold no '?', '#', spaces or control "
        f"characters, got {path!r}",
    )
    env.check(
        "%" not in path,
        "GATEWAY_CALLBACK_PATH must not hold '%' (the gateway matches the decoded path, so a "
        "%-escape is never reached: write the characters themselves, non-ASCII included), "
        f"got {path!r}",
    )
    env.check(
        not {".", ".."} & set(path.split("/")),
        "GATEWAY_CALLBACK_PATH must not hold '.' or '..' segments (clients resolve them "
        f"before sending: '/a/../b' is requested as '/b'), got {path!r}",
    )
    env.check(
        not any(c in path for c in "{}"),
        "GATEWAY_CALLBACK_PATH must be a literal path, without '{' or '}' (aiohttp reads "
        f"them as a route pattern: '/{{tail:.*}}' would answer the probes too), got {path!r}",
    )
    env.check(
        path not in _RESERVED_PATHS,
        f"GATEWAY_CALLBACK_PATH must not be one of {', '.join(_RESERVED_PATHS)} (the "
        f"gateway serves them on the same port), got {path!r}",
    )
    return path


def _blank(char: str) -> bool:
    """Whitespace or a control character: refused by HTTP clients, or sent escaped."""
    return char.isspace() or not char.isprintable()
