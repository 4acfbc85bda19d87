"""Settings: names are a public interface; bad values stop start-up with a clear message."""

from __future__ import annotations

import base64
from urllib.parse import urlsplit

import httpx
import pytest
import structlog
import yarl
from hypothesis import example, given
from hypothesis import strategies as st

from wecombot_common.errors import ConfigError
from wecombot_common.logs import configure_logging
from wecombot_common.settings import (
    EnvReader,
    LogSettings,
    NatsSettings,
    Secret,
    WeComApiSettings,
    WeComCallbackSettings,
    masked_url,
)

GOOD = {
    "WECOM_CORP_ID": "ww1436e0e65a779aee",
    "WECOM_AGENT_ID": "1000002",
    "WECOM_SECRET": "app-secret-value-123",
    "WECOM_TOKEN": "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo",
    "WECOM_ENCODING_AES_KEY": "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt",
}


def _callback(env: dict[str, str]) -> WeComCallbackSettings:
    reader = EnvReader(env)
    settings = WeComCallbackSettings.read(reader)
    reader.raise_if_invalid()
    return settings


def test_good_values_are_read() -> None:
    s = _callback(GOOD)
    assert s.app == "ww1436e0e65a779aee-1000002"
    assert s.token.reveal() == GOOD["WECOM_TOKEN"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"WECOM_ENCODING_AES_KEY": "short"}, "WECOM_ENCODING_AES_KEY must be 43 characters"),
        ({"WECOM_ENCODING_AES_KEY": "!" * 43}, "WECOM_ENCODING_AES_KEY must contain only"),
        ({"WECOM_AGENT_ID": "abc"}, "WECOM_AGENT_ID must be a number"),
        # "²".isdigit() holds and int() refuses it: a ValueError, not a ConfigError
        ({"WECOM_AGENT_ID": "²"}, "WECOM_AGENT_ID must be a number"),
        ({"WECOM_AGENT_ID": "١٠٠٠٠٠٢"}, "WECOM_AGENT_ID must be a number"),
        ({"WECOM_CORP_ID": "   "}, "WECOM_CORP_ID is required"),
        ({"WECOM_CORP_ID": "ww_1"}, "WECOM_CORP_ID must be letters and digits"),
        ({"WECOM_TOKEN": "a" * 33}, "WECOM_TOKEN must be 1 to 32 ASCII letters or digits"),
        ({"WECOM_ENCODING_AES_KEY": "=" * 43}, "WECOM_ENCODING_AES_KEY must contain only"),
        ({"WECOM_CORP_ID": "ww.1"}, "WECOM_CORP_ID must be letters and digits"),
        ({"WECOM_TOKEN": ""}, "WECOM_TOKEN is required"),
        ({"WECOM_TOKEN": "令牌abc"}, "WECOM_TOKEN must be 1 to 32 ASCII letters or digits"),
        ({"WECOM_CORP_ID": ""}, "WECOM_CORP_ID is required"),
    ],
)
def test_bad_values_name_the_variable(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _callback({**GOOD, **change})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        _callback({})
    text = str(info.value)
    for name in ("WECOM_CORP_ID", "WECOM_AGENT_ID", "WECOM_TOKEN", "WECOM_ENCODING_AES_KEY"):
        assert name in text


def test_secrets_never_show_in_reprs() -> None:
    s = _callback(GOOD)
    api = WeComApiSettings.read(EnvReader(GOOD))
    for text in (repr(s), str(s), repr(api), str(Secret(GOOD["WECOM_SECRET"]))):
        assert GOOD["WECOM_TOKEN"] not in text
        assert GOOD["WECOM_ENCODING_AES_KEY"] not in text
        assert GOOD["WECOM_SECRET"] not in text


def test_defaults_match_the_documented_interface() -> None:
    env = EnvReader({})
    nats = NatsSettings.read(env)
    api = WeComApiSettings.read(env, need_secret=False)
    log = LogSettings.read(env)
    assert nats.url == "nats://127.0.0.1:4222"
    assert api.api_base == "https://qyapi.weixin.qq.com"
    assert (log.level, log.format) == ("info", "json")
    assert nats.history_max_bytes is None  # no cap on the event log


@pytest.mark.parametrize(("mb", "cap"), [("0", None), ("1", 2**20), ("16384", 16 * 2**30)])
def test_the_history_cap_is_read_in_mib(mb: str, cap: int | None) -> None:
    reader = EnvReader({"WECOMBOT_HISTORY_MAX_MB": mb})
    assert NatsSettings.read(reader).history_max_bytes == cap
    reader.raise_if_invalid()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL must be one of debug|info|warning|error"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT must be one of json|console"),
        ({"NATS_URL": "http://x:4222"}, "NATS_URL must be nats://"),
        ({"WECOM_API_BASE": "qyapi"}, "WECOM_API_BASE must be a URL"),
        ({"NATS_USER": "gateway"}, "NATS_USER and NATS_PASSWORD go together"),
        ({"WECOMBOT_DUPLICATE_WINDOW": "5"}, "WECOMBOT_DUPLICATE_WINDOW must be a number"),
        # nan passed every bound (all comparisons are false), then crashed a user: exit 1
        ({"WECOMBOT_DUPLICATE_WINDOW": "nan"}, "WECOMBOT_DUPLICATE_WINDOW must be a number"),
        ({"WECOMBOT_HISTORY_MAX_AGE": "inf"}, "WECOMBOT_HISTORY_MAX_AGE must be a number"),
        ({"WECOMBOT_HISTORY_MAX_MB": "-1"}, "WECOMBOT_HISTORY_MAX_MB must be an integer"),
        ({"WECOMBOT_HISTORY_MAX_MB": "2GB"}, "WECOMBOT_HISTORY_MAX_MB must be an integer"),
        (  # the bound as written (it said 1.67772e+07)
            {"WECOMBOT_HISTORY_MAX_MB": str(2**24 + 1)},
            "WECOMBOT_HISTORY_MAX_MB must be an integer between 0 and 16777216",
        ),
        # other scripts' digits: int("٣") is 3, float("٣") 3.0
        ({"WECOMBOT_DUPLICATE_WINDOW": "٣٦٠٠"}, "WECOMBOT_DUPLICATE_WINDOW must be a number"),
        ({"NATS_CREDS": "/nonexistent/user.creds"}, "NATS_CREDS must name a readable file"),
        ({"NATS_CREDS": "/"}, "NATS_CREDS must name a readable file"),  # a directory
    ],
)
def test_other_bad_values(env: dict[str, str], message: str) -> None:
    reader = EnvReader(env)
    LogSettings.read(reader)
    NatsSettings.read(reader)
    WeComApiSettings.read(reader, need_secret=False)
    with pytest.raises(ConfigError, match=message):
        reader.raise_if_invalid()


API = "https://qyapi.weixin.qq.com"


def test_choices_and_base_urls_are_read_as_operators_write_them() -> None:
    """LOG_LEVEL=INFO as commonly written; a base URL with a trailing '/' (paths are
    appended to it: '//cgi-bin/gettoken' is another path to some servers)."""
    written = {"LOG_LEVEL": "INFO", "LOG_FORMAT": "Console", "WECOM_API_BASE": f"{API}/"}
    reader = EnvReader({**GOOD, **written})
    logs, api = LogSettings.read(reader), WeComApiSettings.read(reader)
    assert (logs.level, logs.format, api.api_base) == ("info", "console", API)
    assert reader.problems == []


def _api_base(url: str) -> EnvReader:
    reader = EnvReader({**GOOD, "WECOM_API_BASE": url})
    WeComApiSettings.read(reader)
    return reader


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # urlsplit raised ValueError in the token service's constructor (and in `wecombot
        # doctor`): exit 1 with a traceback instead of 2 naming the setting.
        ("https://[qyapi.weixin.qq.com", "does not parse as a URL"),
        ("https://qyapi.weixin.qq.com:https", "does not parse as a URL"),
        ("https://qyapi.weixin.qq.com:99999", "does not parse as a URL"),
        ("https://:443", "names no host"),
        ("https://", "names no host"),
        ("https:qyapi.weixin.qq.com", "must be a URL starting with http:// or https://"),
        ("https://qyapi weixin.qq.com", "must not hold spaces or control characters"),
        ("https://qyapi\x01.weixin.qq.com", "must not hold spaces or control characters"),
        ("https://qyapi\\weixin.qq.com", "must name a host of letters, digits"),
        ("https://企业微信.cn", "must name a host .* in its xn-- form"),
        ("https://xn--zz.cn", "names an xn-- \\(punycode\\) host that is not valid IDNA"),
        ("https://qyapi.weixin.qq.com:0", "must not name port 0"),
        # A base for paths: '/cgi-bin/gettoken' would land after the query.
        ("https://qyapi.weixin.qq.com/?x=1", "must not hold a query or fragment"),
        ("https://qyapi.weixin.qq.com#top", "must not hold a query or fragment"),
    ],
)
def test_an_api_base_no_client_can_use_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"WECOM_API_BASE {message}"):
        _api_base(url).raise_if_invalid()


@pytest.mark.parametrize(
    "url",
    [
        "https://bot:S3cretPw@qyapi.weixin.qq.com",
        "https://S3cretPw@qyapi.weixin.qq.com",
        "https://bot:S3cret/Pw@qyapi.weixin.qq.com",  # a '/' in it: does not even parse
        "https://bot:S3cretPw@[qyapi.weixin.qq.com",
        "bot:S3cretPw@qyapi.weixin.qq.com",
    ],
)
def test_a_password_in_the_api_base_is_refused_and_never_shown(url: str) -> None:
    """The token service showed the host with it ('ConnectError calling bot:pw@…'), and
    `wecombot doctor` the whole URL."""
    [problem] = _api_base(url).problems
    assert problem.startswith("WECOM_API_BASE ")
    assert "S3cret" not in problem and "***@" in problem


def test_a_user_in_the_api_base_says_where_the_secret_goes() -> None:
    [problem] = _api_base("https://ww1:secret@qyapi.weixin.qq.com").problems
    assert problem.startswith("WECOM_API_BASE must not hold user:password@")
    assert "WECOM_SECRET" in problem


@given(
    scheme=st.sampled_from(["http", "https", "HTTPS", "ftp", ""]),
    separator=st.sampled_from(["://", ":", ":///"]),
    rest=st.text(alphabet="ah09.-_:@[]/%?#\\ \x01é", max_size=16),
)
@example(scheme="https", separator="://", rest="qyapi.weixin.qq.com")
@example(scheme="http", separator="://", rest="[::1]:8080/base")
@example(scheme="http", separator="://", rest="[fe80::1%25eth0]/")
@example(scheme="https", separator="://", rest="xn--bcher-kva.de/v1")
@example(scheme="https", separator="://", rest="xn--zz.de/v1")
@example(scheme="http", separator="://", rest="u:p@h/v1")
@example(scheme="http", separator="://", rest="[bad/v1")
@example(scheme="http", separator="://", rest="h:99999")
@example(scheme="http", separator="://", rest="h\\x")
def test_an_accepted_url_is_one_every_client_here_reads(
    scheme: str, separator: str, rest: str
) -> None:
    """urlsplit (the token service, the llm's proxy choice, doctor), httpx (every call)
    and yarl (aiohttp, which sends the llm's calls: it reads the URL httpx hands it) all
    take it, with a host and without user:password@ (a password would be logged)."""
    url = f"{scheme}{separator}{rest}"
    reader = EnvReader({"BASE": url})
    base = reader.url("BASE", "https://unused.example")
    if reader.problems:
        return  # refused at start, the variable named: exit 2
    parts = urlsplit(base)
    assert parts.port != 0 and parts.hostname and "@" not in parts.netloc
    sent = httpx.URL(f"{base}/cgi-bin/gettoken")
    assert sent.host
    assert yarl.URL(str(sent)).host


@pytest.mark.parametrize(
    "url",
    [
        "nats://wecombot:pw-s3cret@[bad",  # urlsplit: invalid IPv6 URL
        "nats://127.0.0.1:99999",  # port out of range
        "nats://127.0.0.1:42x2",
        "nats://:4222",  # no host
        "nats://a:4222,ws://b:8080",  # nats-py refuses to mix them
    ],
)
def test_a_nats_url_nats_py_cannot_use_is_refused_at_start(url: str) -> None:
    """These passed the settings and crashed the service at its first connection with
    nats-py's traceback (exit 1, ``service.crashed``), not a message naming NATS_URL."""
    env = EnvReader({"NATS_URL": url})
    NatsSettings.read(env)
    with pytest.raises(ConfigError, match="NATS_URL must be nats://host:port") as refused:
        env.raise_if_invalid()
    assert "s3cret" not in str(refused.value)


def test_a_bad_nats_url_is_quoted_without_its_password() -> None:
    url = "nats://wecombot:Sup3rS3cret@nats-1:4222, natss://wecombot:Sup3rS3cret@nats-2:4222"
    env = EnvReader({"NATS_URL": url})
    NatsSettings.read(env)
    with pytest.raises(ConfigError, match="NATS_URL must be nats://host:port") as refused:
        env.raise_if_invalid()
    assert "Sup3rS3cret" not in str(refused.value)
    assert "nats-2:4222" in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://gw.example.com/v1?subscription-key=S3cretKey",
        "https://gw.example.com/v1#S3cretKey",
        "https://bot:S3cret?Key@gw.example.com/v1",
        "https://gw.example.com/v1?key=S3cretKey&user=a@b",
    ],
)
def test_a_refused_base_url_is_quoted_without_its_query(url: str) -> None:
    env = EnvReader({"OPENAI_BASE_URL": url})
    env.url("OPENAI_BASE_URL", "https://api.openai.com/v1")
    [problem] = env.problems
    assert "S3cret" not in problem and "Key" not in problem, problem


def test_a_password_in_nats_url_is_a_secret_even_one_no_pattern_finds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every service logs the URL it connects to; the log's userinfo pattern stops at a
    quote or a space, so the password itself must be registered."""
    nats = NatsSettings.read(EnvReader({"NATS_URL": "nats://wecombot:S3cr3t'pw x@127.0.0.1:4222"}))
    assert [s.reveal() for s in nats.secrets] == ["S3cr3t'pw x"]
    configure_logging(LogSettings(), service="test", secrets=nats.secrets)
    structlog.get_logger("t").info("nats.connecting", nats_url=nats.url)
    err = capsys.readouterr().err
    assert "S3cr3t" not in err and "wecombot:" in err


def _secrets_of_each_service(env: dict[str, str]) -> dict[str, set[str]]:
    """What each service hands its log redaction, read from the same environment."""
    from wecombot_gateway.settings import GatewaySettings
    from wecombot_llm.settings import LlmSettings
    from wecombot_sender.settings import SenderSettings
    from wecombot_token.settings import TokenSettings

    sender, token = SenderSettings.from_env(env), TokenSettings.from_env(env)
    return {
        "gateway": {s.reveal() for s in GatewaySettings.from_env(env).secrets},
        "llm": {s.reveal() for s in LlmSettings.from_env(env).secrets},
        "sender": {s.reveal() for s in sender.log.extra_secrets},
        "token": {s.reveal() for s in (*token.secrets, *token.log.extra_secrets)},
    }


def test_every_service_redacts_the_nats_password_and_its_own_secrets() -> None:
    env = {
        **GOOD,
        "NATS_URL": "nats://wecombot:pw-s3cret-9@nats:4222",
        "OPENAI_API_KEY": "sk-k3y-1",
    }
    secrets = _secrets_of_each_service(env)
    for service, held in secrets.items():
        assert "pw-s3cret-9" in held, service
    assert {GOOD["WECOM_TOKEN"], GOOD["WECOM_ENCODING_AES_KEY"]} <= secrets["gateway"]
    assert "sk-k3y-1" in secrets["llm"]
    assert GOOD["WECOM_SECRET"] in secrets["token"]
    # The sender never uses the Secret, but reads it (the token service's WeCom API
    # settings) when it is set, as `make run` hands ./.env to every service: held, so
    # redacted too.
    assert GOOD["WECOM_SECRET"] in secrets["sender"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://bot:p@ss@host/[", "https://***@host/["),  # to the last '@'
        ("bot:hunter2@host://x", "***@host://x"),  # no scheme to start from
        ("https://host/v1?key=hunter2#frag", "https://host/v1?***"),
    ],
)
def test_a_url_quoted_in_an_error_hides_its_credentials(url: str, shown: str) -> None:
    assert masked_url(url) == shown


@pytest.mark.parametrize("url", ["ws://nats:8080", "wss://nats.example.com:443"])
def test_nats_over_websocket_is_accepted(url: str) -> None:
    reader = EnvReader({"NATS_URL": url})
    assert NatsSettings.read(reader).url == url
    assert reader.problems == []


def test_an_ipv6_host_with_anything_but_a_port_after_it_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"nothing but ':port' after an IPv6 address"):
        _api_base("https://[::1]junk/v1").raise_if_invalid()


def _secrets_with_a_proxy(service: str, proxy: str) -> list[str]:
    """What ``service``'s settings give the logs to hide, with ``proxy`` as HTTPS_PROXY."""
    from wecombot_llm.settings import LlmSettings
    from wecombot_sender.settings import SenderSettings
    from wecombot_token.settings import TokenSettings

    env = {
        "HTTPS_PROXY": proxy,
        "OPENAI_API_KEY": "sk-proxy-test",
        "WECOM_CORP_ID": "ww1",
        "WECOM_AGENT_ID": "1000002",
        "WECOM_SECRET": "secret-of-the-app",
    }
    secrets: tuple[Secret, ...]
    if service == "llm":
        secrets = LlmSettings.from_env(env).secrets
    elif service == "sender":
        secrets = SenderSettings.from_env(env).log.extra_secrets
    else:
        secrets = TokenSettings.from_env(env).secrets
    return [s.reveal() for s in secrets]


@pytest.mark.parametrize("service", ["llm", "sender", "token"])
def test_a_proxy_password_is_among_the_secrets_the_logs_hide(service: str) -> None:
    """The URL pattern hides it only where it shows as a URL's userinfo; an error text
    quoting it otherwise (a proxy's 407 page, say) showed it."""
    secrets = _secrets_with_a_proxy(service, "http://bot:Pr0xy-pa55word@proxy.corp:3128")
    assert "Pr0xy-pa55word" in secrets


@pytest.mark.parametrize("service", ["llm", "sender", "token"])
def test_a_proxy_password_in_basic_credentials_is_among_the_secrets_the_logs_hide(
    service: str,
) -> None:
    """A proxy's 407 page (or a body a proxy answers) quoting the Proxy-Authorization
    header the client sent shows the password in base64: the llm stored it in
    ReplyFailed.reason, every service logged it."""
    secrets = _secrets_with_a_proxy(service, "http://bot:Pr0xy-pa55%40word@proxy.corp:3128")
    basic = base64.b64encode(b"bot:Pr0xy-pa55@word").decode()  # as the header carries it
    assert basic in secrets
    assert "Pr0xy-pa55@word" in secrets  # decoded, as sent and as an error text may quote it


@pytest.mark.parametrize("service", ["llm", "sender", "token"])
def test_a_bare_proxy_token_in_basic_credentials_is_among_the_secrets_the_logs_hide(
    service: str,
) -> None:
    """A proxy URL with a token and no password (http://TOKEN@host) is sent as Basic
    credentials too, ``TOKEN:`` in base64 (httpx and aiohttp alike)."""
    secrets = _secrets_with_a_proxy(service, "http://Pr0xyT0ken@proxy.corp:3128")
    assert "Pr0xyT0ken" in secrets
    assert base64.b64encode(b"Pr0xyT0ken:").decode() in secrets
