"""Small helpers the operator commands (``doctor``, ``dlq``, ``setup``, ``dev``) share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path

from dotenv import dotenv_values
from nats.aio.client import Client as NATS

from wecombot_common import bus
from wecombot_common.errors import ConfigError
from wecombot_common.logs import redact
from wecombot_common.settings import NatsSettings, without_credentials

__all__ = [
    "WECOM_KEYS",
    "clip",
    "connect_once",
    "nats_unreachable",
    "no_jetstream",
    "permission_refused",
    "read_dotenv",
    "without_credentials",
]


# An app's five WeCom settings: what the sandbox replaces, and what doctor asks for.
WECOM_KEYS = (
    "WECOM_CORP_ID",
    "WECOM_AGENT_ID",
    "WECOM_SECRET",
    "WECOM_TOKEN",
    "WECOM_ENCODING_AES_KEY",
)


def read_dotenv(path: Path, into: MutableMapping[str, str]) -> dict[str, str | None]:
    """``path`` as python-dotenv reads a ``.env``: ``#`` comments (at the end of an
    unquoted value too), ``export``, quotes, escapes such as ``\\n`` in double quotes (a
    welcome message of two lines), values over several lines in quotes. No ``${VAR}``
    expansion: a password or key may hold a ``$``. Variables already set win; an empty
    value sets nothing (as an unset one). Returns what the file holds, every name.

    ConfigError, naming the file, for one that is not UTF-8 (a ``.env`` saved as GBK on
    Windows, with a Chinese welcome message) or cannot be read: it was a traceback from
    the codec that never said which file."""
    if not path.is_file():
        return {}
    try:
        found = dotenv_values(path, interpolate=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 (line {line}: byte {exc.object[exc.start]:#04x}): save it "
            "as UTF-8 (an editor on Chinese Windows may have saved it as GBK)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    for key, value in found.items():
        if key and value and not into.get(key):
            into[key] = value
    return dict(found)


def clip(text: str, limit: int = 160) -> str:
    """``text`` on one line (whitespace runs become one space), at most ``limit`` long,
    any registered secret redacted first (``logs.redact``): what is shown is someone
    else's text (an error page, WeCom's errmsg), and a secret cut by the clip would no
    longer be found whole by any later redaction.

    >>> clip("a  long\\nanswer", 8)
    'a long …'
    """
    flat = " ".join(redact(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


async def connect_once(
    settings: NatsSettings,
    name: str,
    *,
    connect_timeout_s: float,
    error_cb: Callable[[Exception], Awaitable[None]],
) -> NATS:
    """Connect with one attempt per server and no reconnects: a command answers at once
    that NATS is unreachable rather than waiting for it (nats-py treats 0 attempts as
    "retry forever", hence 1). The caller bounds the whole with a timeout."""
    return await bus.connect(
        settings,
        name,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        connect_timeout=connect_timeout_s,
        error_cb=error_cb,
    )


def permission_refused(
    url: str, errors: Sequence[BaseException], user: str | None
) -> tuple[str, str] | None:
    """When the broker refused ``user`` a subject (nats-py hands its ``-ERR`` to the
    error callback, lower-cased, and the request then times out): what it refused, and
    what to do; None when nothing was refused. A timeout alone said nothing of it."""
    refused = [str(e).lower() for e in errors if "permissions violation" in str(e).lower()]
    if not refused:
        return None
    what = []
    if any("for publish" in r for r in refused):
        what.append("requests to the JetStream API")
    if any("for subscription" in r for r in refused):
        what.append("replies on its inbox")
    who = f"the user {user!r}" if user else "a connection without NATS_USER"
    summary = f"NATS at {url} refused {who} {' and '.join(what) or 'a subject'}"
    if user == "admin":
        advice = (
            "The admin user may use every subject (deploy/nats/auth.conf): check the "
            "server's authorization block."
        )
    else:
        advice = (
            "Run it with the admin credentials (NATS_USER=admin and NATS_PASSWORD, or "
            "NATS_CREDS; docs/deploy.md): a service's own user may not read the streams "
            "this way."
        )
    return summary, advice


def nats_unreachable(url: str, exc: BaseException) -> tuple[str, str]:
    """Why the broker at ``url`` (credentials removed) cannot be reached, from the last
    connection error, and what to do: (summary, advice)."""
    text = str(exc)
    if "authorization" in text.lower() or "authentication" in text.lower():
        return (
            f"NATS at {url} refused the credentials ({text.strip()})",
            "Check NATS_USER and NATS_PASSWORD (or NATS_CREDS) for this service: the "
            "server's authorization block must know them.",
        )
    if isinstance(exc, ConnectionRefusedError):
        why = "nothing listens at that address"
    elif isinstance(exc, TimeoutError):
        why = (
            "no answer in time (a firewall dropping packets, the wrong host, or a server "
            "there that is not NATS: a NATS server speaks first, an HTTP one waits)"
        )
    elif isinstance(exc, OSError) and "name" in text.lower():
        why = f"the host name does not resolve ({text})"
    else:
        why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return (
        f"cannot reach NATS at {url}: {why}",
        "Start nats-server with JetStream (nats-server -js), or point NATS_URL at your "
        "broker (on Kubernetes, its Service, e.g. nats://nats.nats.svc:4222). "
        "`wecombot dev` starts its own broker when NATS_URL is unset.",
    )


def no_jetstream(url: str) -> tuple[str, str]:
    """The broker at ``url`` answers without JetStream: (summary, advice)."""
    return (
        f"NATS at {url} answers, but JetStream is not enabled",
        "wecombot keeps its event log in JetStream. Start nats-server with -js (or "
        "`jetstream {}` in its config file); in a cluster enable it on every node; with "
        "accounts, give this account JetStream limits.",
    )
