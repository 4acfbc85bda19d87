"""Settings read from the environment once, at start-up, into frozen objects.

Every service builds its own settings object with ``XxxSettings.from_env(os.environ)``
in its entrypoint and passes it down; nothing else reads ``os.environ``. The pieces here
collect their problems in an :class:`EnvReader`, so a missing or malformed value raises
:class:`ConfigError` naming every bad variable at once::

    >>> env = EnvReader({"WECOM_CORP_ID": "ww1", "NATS_URL": "http://nats:4222"})
    >>> wecom, nats = WeComCallbackSettings.read(env), NatsSettings.read(env)
    >>> env.raise_if_invalid()
    Traceback (most recent call last):
    ...
    wecombot_common.errors.ConfigError: invalid configuration:
      - WECOM_AGENT_ID is required (the AgentId shown on the self-built app's page)
      - WECOM_TOKEN is required (the Token from the app's API-receive settings)
      ...

The variable names are a public interface: keep them.
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import idna

from .errors import ConfigError
from .proxy import proxy_url

__all__ = [
    "EnvReader",
    "LogSettings",
    "NatsSettings",
    "Secret",
    "WeComApiSettings",
    "WeComCallbackSettings",
    "app_key",
    "masked_url",
    "url_problem",
    "without_credentials",
]

T = TypeVar("T")

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]


class Secret:
    """A string that never shows itself in a repr, str or log line.

    >>> s = Secret("hunter2")
    >>> s
    Secret('********')
    >>> s.reveal()
    'hunter2'
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


class EnvReader:
    """Reads typed values from an environment mapping, collecting every problem.

    >>> env = EnvReader({"PORT": "80x"})
    >>> env.integer("PORT", 8080, minimum=1, maximum=65535)
    8080
    >>> env.raise_if_invalid()
    Traceback (most recent call last):
    ...
    wecombot_common.errors.ConfigError: invalid configuration:
      - PORT must be an integer between 1 and 65535, got '80x'
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._env = environ
        self.problems: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def present(self, name: str) -> bool:
        return self._raw(name) is not None

    def text(self, name: str, default: str | None = None, *, hint: str = "") -> str:
        value = self._raw(name)
        if value is not None:
            return value
        if default is None:
            self.problems.append(f"{name} is required" + (f" ({hint})" if hint else ""))
            return ""
        return default

    def optional(self, name: str) -> str | None:
        return self._raw(name)

    def secret(self, name: str, *, required: bool = True, hint: str = "") -> Secret:
        value = self._raw(name)
        if value is None and required:
            self.problems.append(f"{name} is required" + (f" ({hint})" if hint else ""))
        return Secret(value or "")

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        return self.number(name, default, int, "an integer", minimum, maximum)

    def seconds(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        return self.number(name, default, float, "a number of seconds", minimum, maximum)

    def number(
        self,
        name: str,
        default: T,
        parse: Callable[[str], T],
        what: str,
        minimum: float | None,
        maximum: float | None,
    ) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        bounds = _bounds(minimum, maximum)
        try:
            if not raw.isascii():  # int() and float() read "٣" or "²"-like digits too
                raise ValueError(raw)
            value = parse(raw)
        except ValueError:
            self.problems.append(f"{name} must be {what}{bounds}, got {raw!r}")
            return default
        numeric = float(value)  # type: ignore[arg-type]
        if not math.isfinite(numeric):  # nan passes every comparison, then breaks users
            self.problems.append(f"{name} must be {what}{bounds}, got {raw!r}")
            return default
        if (minimum is not None and numeric < minimum) or (
            maximum is not None and numeric > maximum
        ):
            self.problems.append(f"{name} must be {what}{bounds}, got {raw!r}")
            return default
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            self.problems.append(f"{name} must be one of {'|'.join(choices)}, got {raw!r}")
            return default
        return raw.lower()

    def url(
        self,
        name: str,
        default: str,
        *,
        schemes: tuple[str, ...] = ("http", "https"),
        credentials: str = "",
    ) -> str:
        """A base URL an HTTP client can use: it parses, has one of ``schemes`` and a host,
        and holds no ``user:password@`` (``credentials`` says where they go instead). A
        refused URL is quoted with anything up to an ``@`` hidden.

        >>> env = EnvReader({"API": "https://bot:hunter2@api.example.com/v1"})
        >>> env.url("API", "https://api.example.com", credentials="the key goes in API_KEY")
        'https://bot:hunter2@api.example.com/v1'
        >>> print(env.problems[0])  # doctest: +NORMALIZE_WHITESPACE
        API must not hold user:password@ (the key goes in API_KEY),
        got 'https://***@api.example.com/v1'
        """
        raw = self._raw(name) or default
        problem = url_problem(raw, schemes)
        if problem == _USERINFO and credentials:
            problem = f"{problem} ({credentials})"
        if problem is None and ("?" in raw or "#" in raw):
            # Paths are appended to it ('/chat/completions', '/cgi-bin/gettoken'): they
            # would land after the query, and the provider answers 404 to every call.
            problem = "must not hold a query or fragment ('?', '#'): it is a base for paths"
        if problem:
            self.problems.append(f"{name} {problem}, got {masked_url(raw)!r}")
        return raw.rstrip("/")

    def proxy_for(self, url: str, calls: str) -> Secret | None:
        """The environment's proxy for calls to ``url`` (None: direct), read with the
        other settings (:func:`wecombot_common.proxy.proxy_url`), by the service at start
        and by doctor alike; a problem when it is one ``calls`` cannot use. A Secret: its
        URL may hold a password.

        >>> env = EnvReader({"ALL_PROXY": "socks5://egress:1080"})
        >>> env.proxy_for("https://qyapi.weixin.qq.com", "the WeCom API calls")
        >>> print(env.problems[0])  # doctest: +NORMALIZE_WHITESPACE
        the environment's proxy for https:// URLs (ALL_PROXY) is a socks5:// proxy;
        the WeCom API calls can use http:// and https:// proxies only
        """
        if url_problem(url, ("http", "https")) is not None:
            return None  # the URL's own problem is said already
        try:
            found = proxy_url(url, calls=calls, environ=self._env)
        except ConfigError as exc:
            self.problems.append(str(exc))
            return None
        return None if found is None else Secret(found)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def raise_if_invalid(self) -> None:
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise ConfigError(f"invalid configuration:\n{lines}", self.problems)


_USERINFO = "must not hold user:password@"
# What a host name may hold (IPv6 literals in brackets are checked by urlsplit): letters,
# digits, '-', '_' and dots between them, as httpx and aiohttp (yarl) both take it.
_HOST_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$")
_BRACKETED = re.compile(r"^\[[^\[\]]+\](:[0-9]*)?$")


def url_problem(url: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    """Why ``url`` cannot be an HTTP client's base URL (phrased after the variable's
    name), or None. Never quotes the URL: a password may be in it."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "must not hold spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # urlsplit's own message may quote the netloc, password included: not shown.
        return "does not parse as a URL (an unmatched '[' or ']', or a port that is not a number)"
    if parts.scheme not in schemes or not url.lower().startswith(f"{parts.scheme}://"):
        return f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}"
    if "@" in parts.netloc:
        # aiohttp refuses it beside an Authorization header (every call fails), and the
        # services and the doctor show the host, which would show the password too.
        return _USERINFO
    if not parts.hostname:
        return "names no host (it must be like https://host/path)"
    if port == 0:
        return "must not name port 0"
    if parts.netloc.startswith("["):
        if not _BRACKETED.match(parts.netloc):
            return "must hold nothing but ':port' after an IPv6 address's ']'"
    elif not _HOST_NAME.match(parts.hostname):
        return (
            "must name a host of letters, digits, '-', '_' and '.' (an IPv6 address goes in "
            "[brackets], an internationalised name in its xn-- form)"
        )
    if "xn--" in parts.hostname:
        try:
            # As httpx and yarl read an xn-- host (each building a request raises otherwise).
            idna.decode(parts.hostname)
        except UnicodeError:  # idna.IDNAError is one
            return "names an xn-- (punycode) host that is not valid IDNA"
    return None


def url_credentials(urls: str) -> list[str]:
    """The passwords and bare tokens in a comma-separated list of URLs, read as URL
    parsers read userinfo (up to the last '@'; a password may hold ':' or '@').

    >>> url_credentials("nats://bot:it's s3cr@t@n1:4222, tls://t0ken@n2:4222, nats://n3")
    ["it's s3cr@t", 't0ken']
    """
    found: list[str] = []
    for part in urls.split(","):
        rest = part.strip().partition("://")[2]
        userinfo, at, _ = rest.rpartition("@")
        if at and userinfo:
            user, colon, password = userinfo.partition(":")
            found.append(password if colon else user)
    return [s for s in found if s]


def proxy_secrets(proxy: Secret | None) -> tuple[Secret, ...]:
    """The password (or bare token) in a proxy URL (``HTTPS_PROXY=http://u:pw@host``),
    for the logs to redact wherever it shows, not only where the URL pattern finds it;
    and the ``Basic`` credentials the HTTP clients make of it, sent in every request's
    ``Proxy-Authorization``: a proxy's 407 page (or an error body) quoting that header
    shows the password in base64, which no other secret or pattern matches; and the
    password percent-decoded, as the clients send it and an error text may quote it.

    >>> [s.reveal() for s in proxy_secrets(Secret("http://bot:pw%40x@proxy:3128"))]
    ['pw%40x', 'Ym90OnB3QHg=', 'pw@x']
    """
    if proxy is None:
        return ()
    url = proxy.reveal()
    found = url_credentials(url)
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:  # refused by the settings already
        user = password = None
    if user is not None or password is not None:
        # As httpx and aiohttp build it: the user and password percent-decoded.
        pair = f"{unquote(user or '')}:{unquote(password or '')}".encode()
        found.append(base64.b64encode(pair).decode("ascii"))
        if password and unquote(password) not in found:
            found.append(unquote(password))
    return tuple(Secret(s) for s in found)


def _nats_server_url(url: str) -> bool:
    """One server of NATS_URL: a scheme nats-py speaks, a host, a port that is a port
    (nats-py would fail on it with a traceback at the first connection)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
    except ValueError:
        return False
    return parts.scheme in ("nats", "tls", "ws", "wss") and bool(parts.hostname)


def without_credentials(url: str) -> str:
    """``url`` (a comma-separated list of server URLs) without any user, password or
    token: what may be printed of NATS_URL.

    >>> without_credentials("nats://bot:s3cr@t@nats-1:4222, tls://t0ken@nats-2:4222")
    'nats://nats-1:4222,tls://nats-2:4222'
    >>> without_credentials("nats://127.0.0.1:4222")
    'nats://127.0.0.1:4222'
    """
    hosts: list[str] = []
    for part in url.split(","):
        scheme, sep, rest = part.strip().partition("://")
        if not sep:  # no scheme: host[:port], or user:pass@host[:port]
            scheme, rest = "", scheme
        # The last "@" ends the userinfo: a password may contain "@" itself.
        hosts.append(f"{scheme}{sep}{rest.rpartition('@')[2]}")
    return ",".join(hosts)


def masked_url(url: str) -> str:
    """``url`` fit to quote in an error: everything from its scheme up to the last '@'
    hidden (a password may be there, even in a URL too broken to parse), and so is a
    query or fragment (an API key may be there).

    >>> masked_url("https://bot:hunter2@[api/v1")
    'https://***@[api/v1'
    >>> masked_url("https://gw.example.com/v1?subscription-key=hunter2")
    'https://gw.example.com/v1?***'
    """
    at = url.rfind("@")
    if at >= 0:
        scheme, sep, _ = url.partition("://")
        start = len(scheme) + len(sep) if sep and len(scheme) < at else 0
        url = url[:start] + "***" + url[at:]
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=-1)
    return url if cut < 0 else url[: cut + 1] + "***"


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" between {_shown(minimum)} and {_shown(maximum)}"
    if minimum is not None:
        return f" of at least {_shown(minimum)}"
    if maximum is not None:
        return f" of at most {_shown(maximum)}"
    return ""


def _shown(bound: float) -> str:
    """A bound as written: an integer whole (16777216, not 1.67772e+07), else shortest."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


_CORP_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")
_AES_KEY = re.compile(r"^[A-Za-z0-9+/]{43}$")


def app_key(corp_id: str, agent_id: int) -> str:
    """The key that names one WeCom app in events, subjects and caches.

    >>> app_key("ww1436e0e65a779aee", 1000002)
    'ww1436e0e65a779aee-1000002'
    """
    return f"{corp_id}-{agent_id}"


def _corp_id(env: EnvReader) -> str:
    corp_id = env.text("WECOM_CORP_ID", hint="the CorpID under My Company > Company Info")
    if corp_id:
        env.check(
            bool(_CORP_ID.match(corp_id)), "WECOM_CORP_ID must be letters and digits, like ww1a2b3c"
        )
    return corp_id


def _agent_id(env: EnvReader) -> int:
    raw = env.text("WECOM_AGENT_ID", hint="the AgentId shown on the self-built app's page")
    if raw and not (raw.isascii() and raw.isdigit()):  # "²".isdigit(), and int() refuses it
        env.check(False, f"WECOM_AGENT_ID must be a number (the app's AgentId), got {raw!r}")
        return 0
    return int(raw) if raw else 0


@dataclass(frozen=True)
class WeComCallbackSettings:
    """What the gateway needs to verify and decrypt callbacks (API-receive settings)."""

    corp_id: str
    agent_id: int
    token: Secret
    encoding_aes_key: Secret

    @property
    def app(self) -> str:
        return app_key(self.corp_id, self.agent_id)

    @classmethod
    def read(cls, env: EnvReader) -> WeComCallbackSettings:
        corp_id = _corp_id(env)
        agent_id = _agent_id(env)
        token = env.secret("WECOM_TOKEN", hint="the Token from the app's API-receive settings")
        key = env.secret(
            "WECOM_ENCODING_AES_KEY", hint="the EncodingAESKey from the API-receive settings"
        )
        if key:
            raw = key.reveal()
            env.check(
                len(raw) == 43,
                f"WECOM_ENCODING_AES_KEY must be 43 characters, got {len(raw)}",
            )
            env.check(
                len(raw) != 43 or bool(_AES_KEY.match(raw)),
                "WECOM_ENCODING_AES_KEY must contain only letters, digits, '+' and '/'",
            )
        if token:
            raw_token = token.reveal()
            env.check(
                raw_token.isascii() and raw_token.isalnum() and len(raw_token) <= 32,
                "WECOM_TOKEN must be 1 to 32 ASCII letters or digits",
            )
        return cls(corp_id=corp_id, agent_id=agent_id, token=token, encoding_aes_key=key)


WECOM_API_CALLS = "the WeCom API calls (gettoken, message/send)"


@dataclass(frozen=True)
class WeComApiSettings:
    """What the token and sender services need to call the WeCom server API."""

    corp_id: str
    agent_id: int
    secret: Secret
    api_base: str
    proxy: Secret | None = None  # the environment's, for api_base (None: direct)

    @property
    def app(self) -> str:
        return app_key(self.corp_id, self.agent_id)

    @classmethod
    def read(cls, env: EnvReader, *, need_secret: bool = True) -> WeComApiSettings:
        api_base = env.url(
            "WECOM_API_BASE",
            "https://qyapi.weixin.qq.com",
            credentials="WeCom takes none: the app's Secret goes in WECOM_SECRET",
        )
        return cls(
            corp_id=_corp_id(env),
            agent_id=_agent_id(env),
            secret=env.secret(
                "WECOM_SECRET",
                required=need_secret,
                hint="the self-built app's Secret",
            ),
            api_base=api_base,
            proxy=env.proxy_for(api_base, WECOM_API_CALLS),
        )


# WECOMBOT_HISTORY_MAX_MB's largest value: 16 TiB, in MiB.
HISTORY_MAX_MB_LIMIT: Final = 16 * 2**20


@dataclass(frozen=True)
class NatsSettings:
    url: str
    user: str | None
    password: Secret | None
    creds: Path | None
    stream_replicas: int
    duplicate_window_s: float
    history_max_age_s: float
    # WECOMBOT_HISTORY_MAX_MB in bytes; None: no cap (the broker's store is the limit)
    history_max_bytes: int | None = None

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """What of these settings the logs must never show: NATS_PASSWORD, and a password
        or token written into NATS_URL (every service logs the URL it connects to; the
        log's URL pattern cannot find a password holding a quote or a space)."""
        found = [self.password] if self.password else []
        found += [Secret(s) for s in url_credentials(self.url)]
        return tuple(found)

    @classmethod
    def read(cls, env: EnvReader) -> NatsSettings:
        url = env.text("NATS_URL", "nats://127.0.0.1:4222")
        parts = [part.strip() for part in url.split(",")]
        schemes = {part.split("://", 1)[0] for part in parts}
        env.check(
            all(_nats_server_url(part) for part in parts)
            and (schemes <= {"nats", "tls"} or schemes <= {"ws", "wss"}),
            "NATS_URL must be nats://host:port (comma-separated for a cluster; nats:// and "
            f"tls://, or ws:// and wss://), got {','.join(masked_url(p) for p in parts)!r}",
        )
        user = env.optional("NATS_USER")
        password = env.optional("NATS_PASSWORD")
        env.check((user is None) == (password is None), "NATS_USER and NATS_PASSWORD go together")
        creds = env.optional("NATS_CREDS")
        if creds is not None:
            readable = Path(creds).is_file() and os.access(creds, os.R_OK)
            env.check(readable, f"NATS_CREDS must name a readable file, got {creds!r}")
        duplicate_window = env.seconds(
            "WECOMBOT_DUPLICATE_WINDOW", 900.0, minimum=60.0, maximum=86400.0
        )
        max_age = env.seconds(
            "WECOMBOT_HISTORY_MAX_AGE", 30 * 86400.0, minimum=3600.0, maximum=3650 * 86400.0
        )
        max_mb = env.integer("WECOMBOT_HISTORY_MAX_MB", 0, minimum=0, maximum=HISTORY_MAX_MB_LIMIT)
        return cls(
            url=url,
            user=user,
            password=Secret(password) if password is not None else None,
            creds=Path(creds) if creds else None,
            stream_replicas=env.integer("WECOMBOT_STREAM_REPLICAS", 1, minimum=1, maximum=5),
            duplicate_window_s=duplicate_window,
            history_max_age_s=max(max_age, duplicate_window),
            history_max_bytes=max_mb * 2**20 if max_mb else None,
        )


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "json"
    extra_secrets: tuple[Secret, ...] = field(default=())

    @classmethod
    def read(cls, env: EnvReader) -> LogSettings:
        return cls(
            level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            format=env.choice("LOG_FORMAT", "json", ("json", "console")),
        )


def data_dir(env: EnvReader) -> Path:
    return Path(env.text("WECOMBOT_DATA_DIR", "./.wecombot"))


def health_port(env: EnvReader, default: int) -> int:
    """Port of the small /healthz + /readyz server each non-HTTP service runs (0 = off)."""
    return env.integer("WECOMBOT_HEALTH_PORT", default, minimum=0, maximum=65535)


HEALTH_HOST = "0.0.0.0"  # noqa: S104 (probes and Prometheus reach the pod's IP)


def health_host(env: EnvReader) -> str:
    """Address that server listens on: every IPv4 interface by default, ``::`` on an
    IPv6 cluster, ``127.0.0.1`` on a laptop (``wecombot dev``'s sandbox sets that)."""
    return env.text("WECOMBOT_HEALTH_HOST", HEALTH_HOST) or HEALTH_HOST
