"""The environment's egress proxy for the services' outbound HTTP calls, read once.

Every outbound client (the llm's model calls, the token service's ``gettoken``, the
sender's ``message/send``, doctor's checks) takes its proxy from its settings, which
read it here with the other settings (``EnvReader.proxy_for``: ``WeComApiSettings.proxy``,
``ModelSettings.proxy``), rather than from httpx's ``trust_env``. So the services and
doctor agree (doctor reads ./.env as the services started by ``wecombot dev`` get it),
and a proxy none of them can use is a configuration error at start (exit 2) rather than
an ``ImportError`` or ``InvalidURL`` when the first client is built::

    client = httpx.AsyncClient(**client_options(settings.proxy))

The rules are httpx's (``HTTPS_PROXY``/``HTTP_PROXY`` by the URL's scheme, else
``ALL_PROXY``, the lower-case spelling first; none for a host in ``NO_PROXY``), from
environment variables only (not macOS's or Windows' system settings), with one
exception, Go's: a loopback host (``localhost``, 127.0.0.0/8, ``::1``) is never proxied.
A proxy elsewhere cannot reach this machine's loopback, and a laptop's ``HTTP_PROXY``
without ``NO_PROXY`` then sent the sandbox's own calls (the console to the gateway, the
services to the simulated WeCom) to the proxy, where they failed as "unreachable".
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from .errors import ConfigError

if TYPE_CHECKING:  # httpx is imported when a client is built: the gateway never does
    import httpx

__all__ = ["client_options", "httpx_proxy", "is_loopback", "proxy_url"]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_EXPECTED = "http://[user:password@]host:port expected"


def is_loopback(host: str) -> bool:
    """``localhost`` (and its subdomains), 127.0.0.0/8 and ``::1``.

    >>> [is_loopback(h) for h in ("localhost", "127.0.0.2", "::1", "[::1]", "10.0.0.1")]
    [True, True, True, True, False]
    """
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_url(url: str, *, calls: str, environ: Mapping[str, str]) -> str | None:
    """The proxy ``environ`` names for ``url``, or None for a direct connection.

    ``calls`` names what the proxy is for in the error: a ConfigError for a proxy httpx
    cannot use, naming its variable and never quoting its value (it may hold a
    password): another scheme than ``http://`` and ``https://`` (a ``socks5://`` one needs
    ``socksio``, which is not installed), or not a URL (a stray space, no host, a port
    that is not a number). Surrounding whitespace is ignored, as for every setting (a
    Secret made from a file ends with a newline).

    >>> env = {"HTTPS_PROXY": "egress:3128", "NO_PROXY": ".corp"}
    >>> proxy_url("https://qyapi.weixin.qq.com", calls="x", environ=env)
    'http://egress:3128'
    >>> [proxy_url(u, calls="x", environ=env) for u in ("https://llm.corp", "http://[::1]:80")]
    [None, None]
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if is_loopback(host):
        return None
    proxies = _proxies(environ)
    if _bypassed(host, proxies.get("no", "")):
        return None
    variable = parts.scheme if proxies.get(parts.scheme) else "all"
    proxy = proxies.get(variable, "")
    if not proxy:
        return None
    name = f"{variable.upper()}_PROXY"
    scheme, sep, _ = proxy.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        proxy, scheme = f"http://{proxy}", "http"  # as httpx reads one without a scheme
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"the environment's proxy for {parts.scheme}:// URLs ({name}) is a {scheme}:// "
            f"proxy; {calls} can use http:// and https:// proxies only"
        )
    if not _usable(proxy):
        raise ConfigError(
            f"the environment's proxy for {parts.scheme}:// URLs ({name}) is not a URL "
            f"{calls} can use: {_EXPECTED}"
        )
    return proxy


def _usable(proxy: str) -> bool:
    """A URL httpx builds a Proxy from: a host, a numeric port if any, nothing blank."""
    if not proxy.isprintable() or " " in proxy:
        return False
    try:
        parts = urlsplit(proxy)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return bool(parts.hostname)


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` sends ``host`` direct: ``*``; a name, itself or any of its
    subdomains (a leading ``.`` or ``*.`` is ignored, as are a ``scheme://`` before it and
    a ``:port`` after it: hosts are matched, not ports); an IP address, or a network in
    CIDR form (``10.0.0.0/8``, as Kubernetes clusters often list theirs).

    >>> [_bypassed(h, "corp.example, .svc,10.0.0.0/8,*.lan, http://[fd00::1]:8080") for h in
    ...  ("api.corp.example", "corp.example", "a.ns.svc", "10.1.2.3", "nas.lan", "fd00::1",
    ...   "qyapi.weixin.qq.com")]
    [True, True, True, True, True, True, False]
    """
    host = host.lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = _no_proxy_host(raw)
        if entry == "*":
            return True
        if not entry:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        if host == entry or host.endswith(f".{entry}"):
            return True
    return False


def _no_proxy_host(entry: str) -> str:
    """The host (or network, or ``*``) of one ``NO_PROXY`` entry, lower-case."""
    entry = entry.strip().lower()
    if "://" in entry:
        entry = entry.split("://", 1)[1]
    entry = entry.split("/", 1)[0] if not _is_network(entry) else entry
    if entry.startswith("["):  # [v6] or [v6]:port
        return entry[1:].split("]", 1)[0]
    if entry.count(":") == 1:  # host:port (an IPv6 address has more than one)
        entry = entry.split(":", 1)[0]
    if entry.startswith("*."):
        entry = entry[2:]
    return entry.lstrip(".")


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def _proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """``<scheme>_proxy`` variables by scheme, stripped, the lower-case spelling first (as
    ``urllib.request.getproxies_environment`` reads them, from any mapping): an empty
    lower-case one turns off the variable of any other case."""
    proxies = {
        name.lower()[:-6]: value.strip()
        for name, value in environ.items()
        if value.strip() and name.lower().endswith("_proxy")
    }
    for name, value in environ.items():
        if name.endswith("_proxy"):  # its lower-case spelling decides, even when empty
            key = name[:-6].lower()
            if value.strip():
                proxies[key] = value.strip()
            else:
                proxies.pop(key, None)
    return proxies


class Hidden(Protocol):
    """A settings ``Secret``: what :func:`EnvReader.proxy_for` gives."""

    def reveal(self) -> str: ...


def httpx_proxy(proxy: Hidden | None) -> httpx.Proxy | None:
    """A proxy URL from :func:`proxy_url` as httpx's ``Proxy`` (``user:password@`` in it
    is sent as proxy authentication, and kept out of ``Proxy.url``)."""
    import httpx

    return None if proxy is None else httpx.Proxy(proxy.reveal())


def client_options(proxy: Hidden | None) -> dict[str, Any]:
    """httpx client options for calls through ``proxy`` (None: direct), from the
    settings: TLS verified as httpx does with ``trust_env`` (``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` from the process's environment honoured: a proxy that inspects TLS
    signs with the company's CA), without httpx reading the proxy variables itself."""
    import httpx

    return {
        "proxy": httpx_proxy(proxy),
        "verify": httpx.create_ssl_context(trust_env=True),
        "trust_env": False,
    }
