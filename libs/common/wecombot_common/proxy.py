"""The environment's egress proxy for the services' outbound HTTP calls, read once.

Every outbound client (the llm's model calls, the token service's ``gettoken``, the
sender's ``message/send``, doctor's checks) takes its proxy from here rather than from
httpx's ``trust_env``, so all of them agree, and a proxy none of them can use is a
configuration error at start rather than an ``ImportError`` at the first call::

    client = httpx.AsyncClient(**outbound(settings.api_base, calls="the WeCom API calls"))

The rules are httpx's (``HTTPS_PROXY``/``HTTP_PROXY`` by the URL's scheme, else
``ALL_PROXY``; none for a host in ``NO_PROXY``), with one exception, Go's: a loopback
host (``localhost``, 127.0.0.0/8, ``::1``) is never proxied. A proxy elsewhere cannot
reach this machine's loopback, and a laptop's ``HTTP_PROXY`` without ``NO_PROXY`` then
sent the sandbox's own calls (the console to the gateway, the services to the simulated
WeCom) to the proxy, where they failed as "unreachable".
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import ConfigError

if TYPE_CHECKING:  # httpx is imported when a client is built: the gateway never does
    import httpx

__all__ = ["env_proxy", "is_loopback", "outbound", "proxy_url"]


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


def proxy_url(url: str, *, calls: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The proxy ``environ`` (the process's by default) names for ``url``, or None for a
    direct connection.

    ``calls`` names what the proxy is for in the error: a ConfigError for a proxy httpx
    cannot use without another package (only ``http://`` and ``https://`` ones: a
    ``socks5://`` one needs ``socksio``, which is not installed).

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
    proxies = _proxies(os.environ if environ is None else environ)
    if _bypassed(host, proxies.get("no", "")):
        return None
    variable = parts.scheme if proxies.get(parts.scheme) else "all"
    proxy = proxies.get(variable)
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"  # as httpx reads a proxy variable without a scheme
    scheme = proxy.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"the environment's proxy for {parts.scheme}:// URLs ({variable.upper()}_PROXY) "
            f"is a {scheme}:// proxy; {calls} can use http:// and https:// proxies only"
        )
    return proxy


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` sends ``host`` direct: ``*``; a name, itself or any of its
    subdomains (a leading dot is ignored, as urllib and curl do); an IP address, or a
    network in CIDR form (``10.0.0.0/8``, as Kubernetes clusters often list theirs).

    >>> [_bypassed(h, "corp.example, .svc,10.0.0.0/8") for h in
    ...  ("api.corp.example", "corp.example", "a.ns.svc", "10.1.2.3", "qyapi.weixin.qq.com")]
    [True, True, True, True, False]
    """
    host = host.lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy.split(","):
        entry = entry.strip().lower().lstrip(".")
        if entry == "*":
            return True
        if not entry:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        if host == entry or host.endswith(f".{entry}"):
            return True
    return False


def _proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """``<scheme>_proxy`` variables by scheme, the lower-case spelling first (as
    ``urllib.request.getproxies_environment``, from any mapping)."""
    proxies = {
        name.lower()[:-6]: value
        for name, value in environ.items()
        if value and name.lower().endswith("_proxy")
    }
    for name, value in environ.items():
        if name.endswith("_proxy"):  # lower-case: it decides, even when empty
            if value:
                proxies[name[:-6]] = value
            else:
                proxies.pop(name[:-6], None)
    return proxies


def env_proxy(url: str, *, calls: str) -> httpx.Proxy | None:
    """:func:`proxy_url` as httpx's ``Proxy`` (``user:password@`` in the proxy's URL is
    sent as proxy authentication, and kept out of ``Proxy.url``)."""
    import httpx

    found = proxy_url(url, calls=calls)
    return None if found is None else httpx.Proxy(found)


def outbound(url: str, *, calls: str) -> dict[str, Any]:
    """httpx client options for calls to ``url``: its proxy from :func:`env_proxy`,
    and TLS verified as httpx does with ``trust_env`` (``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` honoured: a proxy that inspects TLS signs with the company's CA),
    but without httpx reading the proxy variables again, or ``~/.netrc``."""
    import httpx

    return {
        "proxy": env_proxy(url, calls=calls),
        "verify": httpx.create_ssl_context(trust_env=True),
        "trust_env": False,
    }
