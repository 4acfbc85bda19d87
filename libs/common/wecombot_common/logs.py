"""structlog set-up shared by every service: JSON by default, console in dev, redacted.

Secrets are removed wherever they appear in a log line (any field, nested, in exception
text, in third-party library records routed through the same pipeline)::

    >>> configure_logging(LogSettings(), service="gateway", secrets=[Secret("s3cret!")])
    >>> structlog.get_logger().info("boom", detail="token=s3cret!")  # doctest: +SKIP
    {"event": "boom", "detail": "token=[REDACTED]", "service": "gateway", ...}

Dynamic secrets (an access_token fetched at run time) are added with
:func:`register_secret`; values after ``access_token=`` and ``corpsecret=`` in URLs, and
the password (or token) in a URL's userinfo (``nats://user:pass@host``), are redacted by
pattern even before anyone registers them::

    >>> redact("nats://wecombot:s3cret@nats:4222, nats://t0ken@nats-2:4222")
    'nats://wecombot:[REDACTED]@nats:4222, nats://[REDACTED]@nats-2:4222'
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, MutableMapping
from typing import Any

import structlog

from .settings import LogSettings, Secret

__all__ = ["REDACTED", "LogSampler", "configure_logging", "redact", "register_secret"]

REDACTED = "[REDACTED]"
_MIN_SECRET_LEN = 6  # shorter values would redact ordinary words
_URL_SECRETS = re.compile(r"(?i)((?:access_token|corpsecret|api[_-]?key)=)[^&\s\"']+")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-~+/]+=*")
# scheme://userinfo@ : keep the user name, never the password (or a bare token). The
# userinfo runs to the *last* '@' before the host, as URL parsers read it (nats-py
# included): a password may hold an '@' of its own.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/\s\"',]+)@")
_secrets: set[str] = set()  # for good: the settings' secrets
# The latest ephemeral ones (access tokens: one every two hours, for as long as the
# process lives): kept all, they made every log line slower, ~0.5 ms after a year.
_ephemeral: OrderedDict[str, None] = OrderedDict()
EPHEMERAL_KEPT = 32
_registered: tuple[str, ...] = ()  # both, as a tuple, made once per change


def register_secret(value: str | Secret, *, ephemeral: bool = False) -> None:
    """Redact ``value`` from every log line from now on; ``ephemeral`` (a token that
    expires): only while it is among the latest ``EPHEMERAL_KEPT`` of them."""
    global _registered
    raw = value.reveal() if isinstance(value, Secret) else value
    if len(raw) < _MIN_SECRET_LEN or raw in _secrets:
        return
    if not ephemeral:
        _secrets.add(raw)
        _ephemeral.pop(raw, None)
    elif raw in _ephemeral:
        _ephemeral.move_to_end(raw)
        return
    else:
        _ephemeral[raw] = None
        while len(_ephemeral) > EPHEMERAL_KEPT:
            _ephemeral.popitem(last=False)
    _registered = (*_secrets, *_ephemeral)


def redact(text: str, *, keep: Iterable[str] = ()) -> str:
    """``text`` without any registered secret or secret-looking URL part.

    ``keep``: texts that are not secret however they read (a URL the reader set and is
    shown, as doctor shows the base URL it checks): a registered secret wholly inside
    one of them is left there, redacted everywhere else (a placeholder key ``ollama``
    in ``http://ollama:11434/v1``). The URL patterns apply to them all the same::

        >>> url = "http://ollama:11434/v1"
        >>> register_secret("ollama")  # doctest: +SKIP
        >>> redact(f"{url}: key ollama", keep=[url])  # doctest: +SKIP
        'http://ollama:11434/v1: key [REDACTED]'
    """
    spans = [
        (start, start + len(secret))
        for secret in _registered
        if secret in text
        for start in _occurrences(text, secret)
    ]
    if spans and keep:
        shown = [
            (start, start + len(kept))
            for kept in keep
            if kept and kept in text
            for start in _occurrences(text, kept)
        ]
        spans = [(a, b) for a, b in spans if not any(s <= a and b <= e for s, e in shown)]
    if spans:
        text = _cover(text, spans)
    # Each pattern runs only where it can match (every field of every line comes here).
    if "=" in text:
        text = _URL_SECRETS.sub(rf"\1{REDACTED}", text)
    if "://" in text:
        text = _URL_USERINFO.sub(_userinfo, text)
    if "bearer" in text.lower():  # (?i)bearer matches only what lower() makes "bearer"
        text = _BEARER.sub(rf"\1{REDACTED}", text)
    return text


def _occurrences(text: str, secret: str) -> list[int]:
    """Every start of ``secret`` in ``text``, overlapping ones included."""
    found = []
    start = text.find(secret)
    while start >= 0:
        found.append(start)
        start = text.find(secret, start + 1)
    return found


def _cover(text: str, spans: list[tuple[int, int]]) -> str:
    """One marker over each run of overlapping or touching spans, so no secret keeps a
    part: replacing the secrets one after the other would leave the tail of one that
    overlaps another (``AAAXYZ`` and ``XYZBBB`` in ``AAAXYZBBB``), or cut the longer of
    two where it holds the shorter."""
    spans.sort()
    out: list[str] = []
    kept = 0  # text before this index is written (or covered)
    begin, end = spans[0]
    for start, stop in spans[1:]:
        if start <= end:
            end = max(end, stop)
            continue
        out += (text[kept:begin], REDACTED)
        kept, begin, end = end, start, stop
    out += (text[kept:begin], REDACTED, text[end:])
    return "".join(out)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match.group(2).partition(":")
    kept = f"{user}:" if colon else ""
    return f"{match.group(1)}{kept}{REDACTED}@"


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_scrub(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact(repr(value) if isinstance(value, Secret) else str(value))


def _redact_processor(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return {k: _scrub(v) for k, v in event_dict.items()}


def configure_logging(
    settings: LogSettings, *, service: str, secrets: Iterable[Secret | str] = ()
) -> None:
    """Configure structlog and the stdlib root logger once, at start-up."""
    for secret in (*secrets, *settings.extra_secrets):
        register_secret(secret)
    level = getattr(logging, settings.level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service(service),
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if settings.format == "console"
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: configuration stays replaceable (tests capture logs after a
        # service configured them). The price: a call at a disabled level still builds a
        # bound logger before filter_by_level drops it (≈ 4 µs), so a hot path checks the
        # stdlib level first (wecombot_gateway/app.py).
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Request lines of HTTP clients carry tokens in query strings; keep them out of INFO.
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # A library's warnings.warn went straight to stderr, past the redaction and as a
    # line no log collector parses: through the log pipeline now (logger py.warnings).
    logging.captureWarnings(True)


def _add_service(service: str) -> Any:
    def processor(
        _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("service", service)
        return event_dict

    return processor


class LogSampler:
    """At most ``burst`` lines of one kind per ``period_s``; the rest only counted, and
    the next line written says how many were not. For lines anyone can cause at any
    rate (refused requests) or that repeat for as long as a fault lasts (a broker that
    does not answer), which would otherwise write megabytes a second::

        sampler = LogSampler(burst=1, period_s=30.0)
        if (suppressed := sampler.take("nats.error")) is not None:
            log.warning("nats.error", suppressed=suppressed)

    ``burst=None``: every line is written. At most ``max_kinds`` kinds are remembered
    (a kind may carry a varying text: a subject, an address): past that, those whose
    period is over are forgotten, then the oldest, with what they had not reported.
    """

    __slots__ = ("_burst", "_clock", "_kinds", "_max_kinds", "_period_s")

    def __init__(
        self,
        *,
        burst: int | None,
        period_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 256,
    ) -> None:
        self._burst = burst
        self._period_s = period_s
        self._clock = clock
        self._max_kinds = max_kinds
        # kind → (period started, lines written in it, lines suppressed since the last)
        self._kinds: dict[Hashable, tuple[float, int, int]] = {}

    def take(self, kind: Hashable) -> int | None:
        """None: do not write this line. Otherwise write it, saying the returned count
        of lines of its kind not written before it (when not 0)."""
        now = self._clock()
        entry = self._kinds.get(kind)
        if entry is None:
            if len(self._kinds) >= self._max_kinds:
                self._forget(now)
            entry = (now, 0, 0)
        started, written, suppressed = entry
        if now - started >= self._period_s:
            started, written = now, 0
        if self._burst is not None and written >= self._burst:
            self._kinds[kind] = (started, written, suppressed + 1)
            return None
        self._kinds[kind] = (started, written + 1, 0)
        return suppressed

    def reset(self) -> int:
        """Forget every kind; how many lines were suppressed and not reported since
        (for a closing line: the fault is over)."""
        untold = sum(suppressed for _, _, suppressed in self._kinds.values())
        self._kinds.clear()
        return untold

    def _forget(self, now: float) -> None:
        for kind, (started, _, _) in list(self._kinds.items()):
            if now - started >= self._period_s:
                del self._kinds[kind]
        while len(self._kinds) >= self._max_kinds:  # all current: the oldest go
            del self._kinds[next(iter(self._kinds))]
