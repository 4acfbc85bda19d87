"""The environment's egress proxy for every outbound client (wecombot_common.proxy)."""

from __future__ import annotations

import pytest

from wecombot_common.errors import ConfigError
from wecombot_common.proxy import client_options, httpx_proxy, proxy_url
from wecombot_common.settings import EnvReader, Secret, WeComApiSettings

API = "https://qyapi.weixin.qq.com"


def found(url: str, **environ: str) -> str | None:
    return proxy_url(url, calls="the calls", environ=environ)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/wecom/callback",
        "http://127.8.9.10:18080",
        "http://localhost:4010",
        "http://sim.localhost:4010",
        "http://localhost.:4010",  # the root's dot: the same host
        "http://[::1]:8081",
    ],
)
def test_a_loopback_url_is_never_proxied(url: str) -> None:
    """A laptop's HTTP_PROXY without NO_PROXY sent the sandbox's own calls (the console to
    the gateway, the services to the simulated WeCom) to the proxy, which cannot reach
    this machine's loopback: every message failed as 'the gateway is unreachable'."""
    assert found(url, HTTP_PROXY="http://egress.corp:3128", ALL_PROXY="socks5://e:1") is None


def test_the_proxy_follows_the_scheme_then_all_proxy() -> None:
    proxies = {"HTTPS_PROXY": "egress.corp:3128", "ALL_PROXY": "http://all.corp:3128"}
    assert found(API, **proxies) == "http://egress.corp:3128"
    assert found("http://vllm.internal", **proxies) == "http://all.corp:3128"
    assert found(API) is None
    # a scheme is read as URLs read it, whatever its case
    assert found(API, HTTPS_PROXY="HTTP://egress.corp:3128") == "HTTP://egress.corp:3128"


def test_the_lower_case_variable_wins_even_when_empty() -> None:
    """As urllib reads them: ``https_proxy=`` turns off an ``HTTPS_PROXY``; any other
    spelling ending in ``_proxy`` counts as lower-case."""
    assert found(API, HTTPS_PROXY="http://upper:1", https_proxy="http://lower:1") == (
        "http://lower:1"
    )
    assert found(API, HTTPS_PROXY="http://upper:1", https_proxy="") is None
    assert found(API, HTTPS_PROXY="http://upper:1", HTTPS_proxy="") is None
    assert found(API, HTTPS_PROXY="  ") is None  # blank: unset


def test_surrounding_whitespace_is_ignored_as_in_every_setting() -> None:
    """A Kubernetes Secret made from a file ends with a newline: httpx raised InvalidURL
    when the client was built (doctor died with a traceback, the services crashed)."""
    assert found(API, HTTPS_PROXY="http://u:pw@egress:3128\n") == "http://u:pw@egress:3128"


@pytest.mark.parametrize(
    "value",
    [
        "http://egress:31x8",  # a port that is not a number
        "http://[::1",  # an unclosed bracket
        "http://",  # no host
        "http://user:pw@ egress:3128",  # a space inside
        "http://e\tgress:3128",  # a control character
    ],
)
def test_a_proxy_that_is_not_a_url_is_refused_without_quoting_it(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        found(API, HTTPS_PROXY=value)
    assert str(info.value) == (
        "the environment's proxy for https:// URLs (HTTPS_PROXY) is not a URL the calls can "
        "use: http://[user:password@]host:port expected"
    )


def test_a_proxy_httpx_cannot_use_is_a_configuration_error_naming_its_variable() -> None:
    """httpx raised ImportError (socksio) when the token service or sender built its
    client: a traceback and exit 1, and doctor died with one too."""
    with pytest.raises(ConfigError) as info:
        found(API, ALL_PROXY="socks5://user:pw@egress:1080")
    assert str(info.value) == (
        "the environment's proxy for https:// URLs (ALL_PROXY) is a socks5:// proxy; "
        "the calls can use http:// and https:// proxies only"
    )


def test_a_password_holding_a_scheme_separator_is_never_quoted() -> None:
    """Without a scheme, all before '://' was taken for one and quoted: the user name and
    half the password were in the error."""
    with pytest.raises(ConfigError) as info:
        found(API, HTTPS_PROXY="user:pa://ss@egress:3128")
    assert "pa://ss" not in str(info.value) and "ss@egress" not in str(info.value)


@pytest.mark.parametrize(
    ("host", "direct"),
    [
        ("qyapi.weixin.qq.com", False),
        ("vllm.internal", True),  # listed
        ("gpu1.vllm.internal", True),  # a subdomain of one listed
        ("llm.svc", True),  # '.svc': the leading dot is ignored
        ("nas.lan", True),  # '*.lan'
        ("api.corp", True),  # 'api.corp:443': hosts are matched, not ports
        ("wiki.corp", True),  # 'http://wiki.corp': the scheme is ignored
        ("10.3.4.5", True),  # in a CIDR block
        ("fd00::1", True),  # '[fd00::1]:8080'
        ("11.0.0.1", False),
        ("notvllm.internal", False),  # a suffix, not a subdomain
    ],
)
def test_no_proxy_names_hosts_domains_and_networks(host: str, direct: bool) -> None:
    no_proxy = "vllm.internal, .svc,10.0.0.0/8,*.lan,api.corp:443,http://wiki.corp,[fd00::1]:8080"
    url = f"https://[{host}]/v1" if ":" in host else f"https://{host}/v1"
    assert (found(url, HTTPS_PROXY="http://egress:3128", NO_PROXY=no_proxy) is None) is direct


def test_no_proxy_star_sends_everything_direct() -> None:
    assert found(API, HTTPS_PROXY="http://e:1", no_proxy="*") is None


def test_the_settings_read_the_proxy_with_the_other_problems() -> None:
    env = EnvReader({"https_proxy": "socks5h://egress:1080"})
    assert env.proxy_for(API, "the WeCom API calls") is None
    assert env.proxy_for("http://[bad", "the WeCom API calls") is None  # said elsewhere
    assert env.problems == [
        "the environment's proxy for https:// URLs (HTTPS_PROXY) is a socks5h:// proxy; "
        "the WeCom API calls can use http:// and https:// proxies only"
    ]
    settings = WeComApiSettings.read(
        EnvReader({"HTTPS_PROXY": "http://user:pw@egress:3128"}), need_secret=False
    )
    assert settings.proxy == Secret("http://user:pw@egress:3128")
    assert "pw" not in repr(settings)


def test_client_options_use_the_proxy_given_and_keep_credentials_apart() -> None:
    options = client_options(Secret("http://user:pw@egress.corp:3128"))
    assert options["trust_env"] is False  # httpx does not read the variables itself
    proxy = options["proxy"]
    assert proxy is not None and proxy.auth == ("user", "pw")
    assert "pw" not in str(proxy.url)
    assert httpx_proxy(None) is None
    assert client_options(None)["proxy"] is None
