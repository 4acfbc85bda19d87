"""The environment's egress proxy for every outbound client (wecombot_common.proxy)."""

from __future__ import annotations

import pytest

from wecombot_common.errors import ConfigError
from wecombot_common.proxy import env_proxy, outbound, proxy_url
from wecombot_common.settings import EnvReader

API = "https://qyapi.weixin.qq.com"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/wecom/callback",
        "http://127.8.9.10:18080",
        "http://localhost:4010",
        "http://sim.localhost:4010",
        "http://[::1]:8081",
    ],
)
def test_a_loopback_url_is_never_proxied(url: str) -> None:
    """A laptop's HTTP_PROXY without NO_PROXY sent the sandbox's own calls (the console to
    the gateway, the services to the simulated WeCom) to the proxy, which cannot reach
    this machine's loopback: every message failed as 'the gateway is unreachable'."""
    environ = {"HTTP_PROXY": "http://egress.corp:3128", "ALL_PROXY": "socks5://egress:1080"}
    assert proxy_url(url, calls="calls", environ=environ) is None


def test_the_proxy_follows_the_scheme_then_all_proxy() -> None:
    environ = {"HTTPS_PROXY": "egress.corp:3128", "ALL_PROXY": "http://all.corp:3128"}
    assert proxy_url(API, calls="c", environ=environ) == "http://egress.corp:3128"
    assert proxy_url("http://vllm.internal", calls="c", environ=environ) == "http://all.corp:3128"
    assert proxy_url(API, calls="c", environ={}) is None


def test_the_lower_case_variable_wins_even_when_empty() -> None:
    """As urllib and curl read them: ``https_proxy=`` turns off an ``HTTPS_PROXY``."""
    both = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1"}
    assert proxy_url(API, calls="c", environ=both) == "http://lower:1"
    assert (
        proxy_url(API, calls="c", environ={"HTTPS_PROXY": "http://upper:1", "https_proxy": ""})
        is None
    )


@pytest.mark.parametrize(
    ("host", "direct"),
    [
        ("qyapi.weixin.qq.com", False),
        ("vllm.internal", True),  # listed
        ("gpu1.vllm.internal", True),  # a subdomain of one listed
        ("llm.svc", True),  # '.svc': the leading dot is ignored
        ("10.3.4.5", True),  # in a CIDR block
        ("11.0.0.1", False),
        ("notvllm.internal", False),  # a suffix, not a subdomain
    ],
)
def test_no_proxy_names_hosts_domains_and_networks(host: str, direct: bool) -> None:
    environ = {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "vllm.internal, .svc,10.0.0.0/8"}
    found = proxy_url(f"https://{host}/v1", calls="c", environ=environ)
    assert (found is None) is direct


def test_no_proxy_star_sends_everything_direct() -> None:
    assert proxy_url(API, calls="c", environ={"HTTPS_PROXY": "http://e:1", "no_proxy": "*"}) is None


def test_a_proxy_httpx_cannot_use_is_a_configuration_error_naming_its_variable() -> None:
    """httpx raised ImportError (socksio) when the token service or sender built its
    client: a traceback and exit 1, and doctor died with one too."""
    environ = {"ALL_PROXY": "socks5://user:pw@egress:1080"}
    with pytest.raises(ConfigError) as info:
        proxy_url(API, calls="the WeCom API calls", environ=environ)
    assert str(info.value) == (
        "the environment's proxy for https:// URLs (ALL_PROXY) is a socks5:// proxy; "
        "the WeCom API calls can use http:// and https:// proxies only"
    )


def test_the_settings_find_an_unusable_proxy_with_the_other_problems() -> None:
    env = EnvReader({"https_proxy": "socks5h://egress:1080", "WECOM_API_BASE": API})
    env.proxy_for(API, "the WeCom API calls")
    env.proxy_for("http://[bad", "the WeCom API calls")  # the URL's own problem is elsewhere
    assert env.problems == [
        "the environment's proxy for https:// URLs (HTTPS_PROXY) is a socks5h:// proxy; "
        "the WeCom API calls can use http:// and https:// proxies only"
    ]


def test_outbound_options_read_the_proxy_once_and_keep_credentials_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@egress.corp:3128")
    options = outbound(API, calls="c")
    assert options["trust_env"] is False  # httpx does not read the variables (or .netrc) again
    proxy = options["proxy"]
    assert proxy is not None and proxy.auth == ("user", "pw")
    assert "pw" not in str(proxy.url)
    assert env_proxy("http://127.0.0.1:9", calls="c") is None
