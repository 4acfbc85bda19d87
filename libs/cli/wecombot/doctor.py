"""``wecombot doctor``: check a real configuration, and explain each problem with its fix.

::

    wecombot doctor [--public-url URL] [--timeout SECONDS]

Reads the environment (and ``./.env``, as ``wecombot dev`` does) and checks, in order:

``settings``  every service's own settings loader (gateway, llm, sender, token) accepts
              them: present, well-formed (43-character AES key, numeric AgentId, …)
``nats``      NATS_URL is reachable, the credentials are accepted, JetStream is enabled
``gettoken``  WeCom issues an access_token for WECOM_CORP_ID + WECOM_SECRET, or why not
              (40001 secret, 40013 corp id, 60020 with the IP WeCom saw, network …)
``callback``  with ``--public-url`` (or ``WECOMBOT_PUBLIC_URL``): the URL verification
              WeCom sends when the URL is saved, signed and encrypted with our Token and
              EncodingAESKey, is answered with the echo
``model``     the environment's proxy is one the llm accepts (``ModelSettings.proxy``), and
              the OpenAI-compatible endpoint answers (``GET /models``, else a one-token
              completion); without OPENAI_API_KEY: offline mode, reported as such

Exit code: 0 when nothing failed (warnings and skipped checks allowed), 1 when a check
failed, 2 for bad arguments. Secrets are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import re
import secrets
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import httpx
import nats.errors
import nats.js.errors
from nats.js.api import StreamInfo

from wecombot_common import bus, topology
from wecombot_common.errors import ConfigError
from wecombot_common.logs import REDACTED, redact, register_secret
from wecombot_common.proxy import client_options, proxy_url
from wecombot_common.runtime import event_loop_choice
from wecombot_common.settings import (
    WECOM_API_CALLS,
    EnvReader,
    NatsSettings,
    Secret,
    WeComApiSettings,
    WeComCallbackSettings,
    masked_url,
    proxy_secrets,
    url_credentials,
    url_problem,
)
from wecombot_common.sim.callbacks import CallbackBuilder
from wecombot_gateway.settings import GatewaySettings, read_callback_path
from wecombot_llm.model import error_detail, provider_auth
from wecombot_llm.settings import MODEL_CALLS, LlmSettings, ModelSettings
from wecombot_sender.settings import SenderSettings
from wecombot_token.domain import Failure
from wecombot_token.settings import TokenSettings
from wecombot_token.source import WeComTokenSource

from .names import known_settings, misspelt
from .shared import (
    WECOM_KEYS,
    clip,
    connect_once,
    nats_unreachable,
    no_jetstream,
    permission_refused,
    read_dotenv,
    without_credentials,
)

__all__ = ["ACCEPTS_ARGS", "Finding", "Report", "diagnose", "main"]

ACCEPTS_ARGS = True

Status = Literal["ok", "warn", "fail", "skip"]
_TAGS: dict[Status, str] = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}
_WIDTH = 100
_NAME_WIDTH = 9

# Where each value is found, for the fix line of a settings problem.
WHERE = {
    "WECOM_CORP_ID": "admin console → 我的企业 (My Company) → 企业信息 → 企业ID (starts with ww)",
    "WECOM_AGENT_ID": "admin console → 应用管理 (Apps) → your self-built app → AgentId",
    "WECOM_SECRET": "admin console → 应用管理 → your app → Secret → 查看 (WeCom sends it to you)",
    "WECOM_TOKEN": "your app → 接收消息 (Receive messages) → 设置API接收 → Token (随机获取)",
    "WECOM_ENCODING_AES_KEY": "your app → 接收消息 → 设置API接收 → EncodingAESKey (随机获取)",
    "WECOM_API_BASE": "leave unset for https://qyapi.weixin.qq.com",
    "OPENAI_": "docs/providers.md lists the values for each provider",
    "LLM_": ".env.example documents each LLM_ setting",
    "NATS_": "the broker's address and credentials, e.g. NATS_URL=nats://nats:4222",
}
_FROM_IP = re.compile(r"from ip:\s*([0-9A-Fa-f:.]+[0-9A-Fa-f])")


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    summary: str
    details: tuple[str, ...] = ()


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    # The settings' URLs and names doctor shows as set (``shown_as_set``): a secret found
    # inside one is left there, its own text (a placeholder key naming the host).
    shown: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return any(f.status == "fail" for f in self.findings)

    def render(self) -> str:
        lines: list[str] = []
        indent = " " * (len(_TAGS["ok"]) + _NAME_WIDTH + 2)
        for f in self.findings:
            head = f"{_TAGS[f.status]} {f.check:<{_NAME_WIDTH}} "
            # Redacted before it is wrapped: a wrap may break a secret at a hyphen.
            lines.extend(
                textwrap.wrap(
                    redact(f.summary, keep=self.shown),
                    _WIDTH,
                    initial_indent=head,
                    subsequent_indent=indent,
                )
            )
            for detail in f.details:
                lines.extend(
                    textwrap.wrap(
                        redact(detail, keep=self.shown),
                        _WIDTH,
                        initial_indent=indent,
                        subsequent_indent=indent + "  ",
                    )
                    or [""]
                )
        failures = sum(f.status == "fail" for f in self.findings)
        warnings = sum(f.status == "warn" for f in self.findings)
        lines.append("")
        if failures:
            lines.append(
                f"{failures} check{'s' if failures > 1 else ''} failed: fix "
                f"{'them' if failures > 1 else 'it'} and run `wecombot doctor` again."
            )
        elif warnings:  # not "no problems" under "WeCom cannot reach it"
            lines.append(f"No check failed; {warnings} warning{'s' if warnings > 1 else ''} above.")
        else:
            lines.append("No problems found.")
        return "\n".join(lines)


# ---------------------------------------------------------------- settings


def check_settings(environ: Mapping[str, str], unknown: Sequence[str] = ()) -> Finding:
    """Every service's own loader, so doctor and the services never disagree.
    ``unknown``: what to say of names ./.env sets that are no setting
    (:func:`names.misspelt`)."""
    loaders: list[tuple[str, Callable[[Mapping[str, str]], object]]] = [
        ("gateway", GatewaySettings.from_env),
        ("llm", LlmSettings.from_env),
        ("sender", SenderSettings.from_env),
        ("token", TokenSettings.from_env),
    ]
    problems: dict[str, list[str]] = {}
    for service, load in loaders:
        try:
            load(environ)
        except ConfigError as exc:
            for problem in exc.problems or (str(exc),):
                problems.setdefault(problem, []).append(service)
    try:  # run_service reads it before any service's own settings
        event_loop_choice(environ)  # uvloop itself: checked where the services run
    except ConfigError as exc:
        for problem in exc.problems or (str(exc),):
            problems.setdefault(problem, []).extend(service for service, _ in loaders)
    ignored = list(unknown)
    if not problems:
        summary = "every service accepts its settings (gateway, llm, sender, token)"
        if ignored:
            return Finding("settings", "warn", summary, tuple(ignored))
        return Finding("settings", "ok", summary)
    details: list[str] = []
    if not any((environ.get(k) or "").strip() for k in WECOM_KEYS):
        details.append(
            "No WeCom settings at all: that is sandbox mode, where `wecombot dev` plays WeCom "
            "itself. To use a real app, fill in WECOM_CORP_ID, WECOM_AGENT_ID, WECOM_SECRET, "
            "WECOM_TOKEN and WECOM_ENCODING_AES_KEY (README: from the sandbox to a real app)."
        )
    for problem, services in problems.items():
        details.append(f"- {problem} (read by {', '.join(services)})")
        where = _where(problem)
        if where:
            details.append(f"    where: {where}")
    details.extend(ignored)
    details.append("Fix: set them in ./.env or the environment; .env.example documents each one.")
    count = len(problems)
    return Finding(
        "settings",
        "fail",
        f"{count} problem{'s' if count > 1 else ''} in the settings",
        tuple(details),
    )


def _fix_first(problems: Sequence[str]) -> str:
    """What a check needs fixed before it can run: the settings its problems are about
    (the names each starts with: "NATS_USER and NATS_PASSWORD go together"), not every
    one the check reads, nor one a problem's hint names."""
    known = known_settings()
    names: dict[str, None] = {}
    for problem in problems:
        for word in problem.replace(",", " ").split():
            if word in known:
                names[word] = None
            elif word != "and":
                break
    if not names:
        return "fix the settings first (see settings above)"
    *first, last = names
    return f"fix {', '.join(first)}{' and ' if first else ''}{last} first (see settings above)"


def _where(problem: str) -> str | None:
    name = problem.split(" ", 1)[0]
    for prefix, where in WHERE.items():
        if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
            return where
    return None


# ---------------------------------------------------------------- NATS


async def check_nats(environ: Mapping[str, str], timeout_s: float) -> Finding:
    env = EnvReader(environ)
    settings = NatsSettings.read(env)
    if env.problems:
        return Finding("nats", "skip", _fix_first(env.problems))
    url = without_credentials(settings.url)  # NATS_URL may carry a password: never shown
    errors: list[BaseException] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)

    # Each server of NATS_URL its share of the time to greet us: a single slow one all of
    # it (a third, as before, refused one answering in 2 s of `wecombot dev`'s 5).
    servers = len([s for s in settings.url.split(",") if s.strip()]) or 1
    try:
        async with asyncio.timeout(timeout_s):
            nc = await connect_once(
                settings,
                "wecombot-doctor",
                connect_timeout_s=max(1.0, timeout_s / servers),
                error_cb=remember,
            )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        last = errors[-1] if errors else exc
        return _nats_unreachable(url, last)
    try:
        if (too_old := bus.server_too_old(nc.connected_server_version)) is not None:
            return Finding(
                "nats",
                "fail",
                f"{url}: {too_old}",
                ("Upgrade the NATS servers (deploy/nats/values.yaml pins the server image).",),
            )
        js = nc.jetstream()
        try:
            async with asyncio.timeout(timeout_s):
                account = await js.account_info()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            summary, advice = no_jetstream(url)
            return Finding("nats", "fail", summary, (advice,))
        except (TimeoutError, nats.errors.Error) as exc:
            if (refused := permission_refused(url, errors, settings.user)) is not None:
                summary, advice = refused
                return Finding("nats", "fail", summary, (advice,))
            return Finding(
                "nats",
                "fail",
                f"NATS at {url} did not answer a JetStream request ({type(exc).__name__})",
                ("The server may be starting, or without a JetStream quorum: check its logs.",),
            )
        details: tuple[str, ...] = ()
        try:
            async with asyncio.timeout(timeout_s):
                stream = await js.stream_info(topology.CONVERSATION_STREAM)
        except nats.js.errors.NotFoundError:
            held = f"stream {topology.CONVERSATION_STREAM} not created yet (the services create it)"
        except (TimeoutError, nats.errors.Error) as exc:
            # JetStream answered, the event log does not (its servers down, its leader
            # being elected, this user refused it): the services can neither append
            # nor read. Said as the check's failure, not a traceback without a report.
            if (refused := permission_refused(url, errors, settings.user)) is not None:
                summary, advice = refused
                return Finding("nats", "fail", summary, (advice,))
            said = getattr(exc, "description", None) or str(exc)
            why = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
            return Finding(
                "nats",
                "fail",
                f"{url} reachable, JetStream enabled, but the stream "
                f"{topology.CONVERSATION_STREAM} does not answer ({why})",
                (
                    "The servers holding its replicas are down, or still electing its "
                    f"leader: `nats stream info {topology.CONVERSATION_STREAM}` (as admin) "
                    "and the NATS servers' logs tell which.",
                ),
            )
        else:
            held, details = _stream_held(stream, settings)
        server = nc.connected_server_version  # its str() is "<nats server v2.11.4>"
        try:
            version = f"{server.major}.{server.minor}.{server.patch}"
        except ValueError:  # not semantic: say what it is
            version = str(server)
        if not (environ.get("NATS_URL") or "").strip():
            details += (
                "NATS_URL is unset, so this is the default address; `wecombot dev` starts its "
                "own broker instead, the services in production need NATS_URL.",
            )
        return Finding(
            "nats",
            "ok",
            f"{url} reachable, JetStream enabled (server {version}, {account.streams} streams; "
            f"{held})",
            details,
        )
    finally:
        await nc.close()


def _stream_held(stream: StreamInfo, settings: NatsSettings) -> tuple[str, tuple[str, ...]]:
    """What the event log holds, against its byte cap (``WECOMBOT_HISTORY_MAX_MB``); and a
    detail naming each stream setting configured here that the stream does not have
    (``wecombot setup`` or a service's start applies them; until then, under the
    production permissions, the services wait, not ready)."""
    size = _mib(stream.state.bytes or 0)
    config = stream.config
    cap = config.max_bytes
    cap = cap if cap is not None and cap > 0 else None  # the server says -1 for none
    of = f"of its {_mib(cap)} cap" if cap is not None else "no byte cap"
    held = f"stream {config.name} holds {stream.state.messages} events, {size} ({of})"
    differ: list[str] = []
    if (config.num_replicas or 1) != settings.stream_replicas:
        differ.append(f"WECOMBOT_STREAM_REPLICAS is {settings.stream_replicas}")
    for name, have, wanted_s in (
        ("WECOMBOT_DUPLICATE_WINDOW", config.duplicate_window, settings.duplicate_window_s),
        ("WECOMBOT_HISTORY_MAX_AGE", config.max_age, settings.history_max_age_s),
    ):  # seconds, read back from the server's nanoseconds
        if have is None or not math.isclose(have, wanted_s, rel_tol=0, abs_tol=1e-3):
            differ.append(f"{name} is {wanted_s:g} s")
    configured = settings.history_max_bytes
    if cap != configured:
        differ.append(
            f"WECOMBOT_HISTORY_MAX_MB is {configured // 2**20 if configured else '0 (no cap)'}"
        )
    if not differ:
        return held, ()
    *first, last = differ
    names = f"{', '.join(first)} and {last}" if first else last
    them = "them" if first else "it"
    return held, (
        f"{names} here, not the stream's: `wecombot setup` applies {them} (a service "
        f"started with {them} does too, where its NATS user may change streams; under "
        f"deploy/nats/auth.conf it waits, not ready, until setup has).",
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _nats_unreachable(url: str, exc: BaseException) -> Finding:
    summary, detail = nats_unreachable(url, exc)
    return Finding("nats", "fail", summary, (detail,))


_PROXY_FIX = (
    "Set HTTPS_PROXY (or HTTP_PROXY, for an http:// URL) to an http://host:port proxy, add "
    "the host to NO_PROXY, or unset ALL_PROXY (docs/providers.md)."
)


def _proxy_problem(environ: Mapping[str, str], url: str, calls: str) -> str | None:
    """Why the environment's proxy for ``url`` keeps a service from starting, or None
    (the settings check lists it too; this check names it instead of skipping)."""
    if url_problem(url) is not None:
        return None
    try:
        proxy_url(url, calls=calls, environ=environ)
    except ConfigError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- gettoken


async def check_gettoken(environ: Mapping[str, str], timeout_s: float) -> Finding:
    env = EnvReader(environ)
    settings = WeComApiSettings.read(env)
    if (problem := _proxy_problem(environ, settings.api_base, WECOM_API_CALLS)) is not None:
        return Finding(
            "gettoken", "fail", f"the token service would not start: {problem}", (_PROXY_FIX,)
        )
    if env.problems:
        return Finding("gettoken", "skip", _fix_first(env.problems))
    source = WeComTokenSource(settings, timeout_s=timeout_s)
    try:
        outcome = await source.fetch()
    finally:
        await source.aclose()
    host = urlsplit(settings.api_base).netloc
    if isinstance(outcome, Failure):
        return explain_gettoken_failure(outcome, settings)
    register_secret(outcome.value, ephemeral=True)
    lifetime = round(outcome.expires_at - outcome.fetched_at)
    issued = f"{host} issued an access_token for {settings.corp_id} (valid {lifetime} s)"
    return await _check_agent(settings, outcome.value, issued, timeout_s)


async def _check_agent(
    settings: WeComApiSettings, token: str, issued: str, timeout_s: float
) -> Finding:
    """Whether WECOM_AGENT_ID is the app whose Secret issued ``token``: WeCom's
    ``agent/get`` (https://developer.work.weixin.qq.com/document/path/90227) answers a
    self-built app's token for that app only. Another AgentId passes every other check,
    and then the gateway refuses every message (403, for another app), which WeCom
    drops after its retries."""
    url = f"{settings.api_base}/cgi-bin/agent/get"
    params = {"access_token": token, "agentid": str(settings.agent_id)}
    try:
        async with httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            **client_options(settings.proxy),  # as gettoken
        ) as client:
            response = await client.get(url, params=params)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        body, why = None, type(exc).__name__
    else:
        why = f"HTTP {response.status_code}"
    if not isinstance(body, dict) or not isinstance(body.get("errcode"), int):
        return Finding(
            "gettoken",
            "warn",
            f"{issued}; WECOM_AGENT_ID {settings.agent_id} could not be checked ({why})",
            ("agent/get did not give WeCom's answer: the AgentId is checked by nothing else.",),
        )
    if body["errcode"] == 0:
        name = str(body.get("name") or "?")[:40]
        return Finding("gettoken", "ok", f"{issued}, app {name!r} (AgentId {settings.agent_id})")
    # Redacted before the cut (a token the cut halved would match nothing): a front of
    # WeCom's API that quotes the request would otherwise print the access_token.
    errmsg = str(body.get("errmsg", ""))[: 200 + len(token) + 1024]
    said = f"WeCom said: errcode {body['errcode']}: {redact(errmsg.replace(token, REDACTED))[:200]}"
    return Finding(
        "gettoken",
        "fail",
        f"WECOM_AGENT_ID {settings.agent_id} is not the app of this WECOM_SECRET "
        f"(agent/get: errcode {body['errcode']})",
        (
            "The AgentId and the Secret must be of the same app: the gateway refuses "
            "callbacks for another AgentId (403, WrongRecipient), and WeCom refuses sends "
            f"with another app's token (301002). Copy both again: {WHERE['WECOM_AGENT_ID']}; "
            f"{WHERE['WECOM_SECRET']}.",
            said,
        ),
    )


def explain_gettoken_failure(failure: Failure, settings: WeComApiSettings) -> Finding:
    said = (
        f"WeCom said: errcode {failure.errcode}: {failure.errmsg}"
        if failure.errmsg is not None
        else f"WeCom said: {failure.message}"
    )
    if failure.errcode == 40001:
        return Finding(
            "gettoken",
            "fail",
            "WeCom refused WECOM_SECRET (errcode 40001)",
            (
                f"The Secret does not belong to an app of {settings.corp_id}. Copy the app's "
                f"Secret again: {WHERE['WECOM_SECRET']}. Each app has its own Secret; the "
                "contacts (通讯录) or customer-contact secrets do not work here.",
                said,
            ),
        )
    if failure.errcode == 40013:
        return Finding(
            "gettoken",
            "fail",
            f"WeCom does not know the CorpID {settings.corp_id!r} (errcode 40013)",
            (f"Copy WECOM_CORP_ID again: {WHERE['WECOM_CORP_ID']}.", said),
        )
    if failure.errcode == 60020:
        match = _FROM_IP.search(failure.errmsg or failure.message)
        where = "应用管理 → your app → 企业可信IP (Trusted IPs) → 配置 in the WeCom admin console"
        if match:
            ip = match.group(1)
            first = (
                f"WeCom saw the request come from {ip}. Add {ip} to the app's trusted IPs: {where}."
            )
        else:
            first = (
                "WeCom did not say which IP it saw. Find the public egress IP of the hosts "
                "that run the token and sender services (for example `curl -s "
                "https://ifconfig.me` on one of them, or ask your network team for the NAT "
                f"gateway's address) and add it to the app's trusted IPs: {where}."
            )
        return Finding(
            "gettoken",
            "fail",
            "WeCom refused this machine's IP address (errcode 60020)",
            (
                first,
                "Every machine that calls WeCom needs its egress IP there; on Kubernetes that "
                "is the cluster's NAT/egress IP, which may differ from this machine's.",
                said,
            ),
        )
    if failure.errcode == 45009:
        return Finding(
            "gettoken",
            "fail",
            "WeCom is rate-limiting gettoken for this app (errcode 45009)",
            (
                "Something calls gettoken too often: only the token service should, once per "
                "token lifetime. Stop other callers and try again in a few minutes.",
                said,
            ),
        )
    if failure.errcode is not None:
        return Finding(
            "gettoken",
            "fail",
            f"gettoken failed with errcode {failure.errcode}",
            (
                said,
                "Look the code up at "
                f"https://open.work.weixin.qq.com/devtool/query?e={failure.errcode}.",
            ),
        )
    return Finding(
        "gettoken",
        "fail",
        f"no usable answer from WeCom at {settings.api_base}",
        (
            failure.message,
            "Check DNS, the firewall and any HTTP proxy between this host and the WeCom API "
            "(outbound HTTPS to qyapi.weixin.qq.com:443); WECOM_API_BASE must stay "
            "https://qyapi.weixin.qq.com (the default) unless you go through a gateway.",
        ),
    )


# ---------------------------------------------------------------- callback URL


async def check_callback(
    environ: Mapping[str, str],
    public_url: str | None,
    timeout_s: float,
    *,
    given_as: str = "--public-url",
) -> Finding:
    """``given_as``: where ``public_url`` came from, as its problems name it (the option,
    or ``WECOMBOT_PUBLIC_URL``)."""
    if not public_url:
        return Finding(
            "callback",
            "skip",
            "no public URL given: pass --public-url https://your.host/wecom/callback (or set "
            "WECOMBOT_PUBLIC_URL) to check that WeCom can reach the gateway",
        )
    # Before the WeCom settings' problems: a URL that is none is said whatever they are.
    problem = url_problem(public_url)
    if problem is not None:
        return Finding("callback", "fail", f"{given_as} {problem}, got {masked_url(public_url)!r}")
    env = EnvReader(environ)
    wecom = WeComCallbackSettings.read(env)
    path = read_callback_path(env)  # the gateway's own rule: no URL for a path it refuses
    if env.problems:
        return Finding("callback", "skip", _fix_first(env.problems))
    parts = urlsplit(public_url)
    url = public_url if parts.path not in ("", "/") else public_url.rstrip("/") + path
    builder = CallbackBuilder(
        corp_id=wecom.corp_id,
        agent_id=wecom.agent_id,
        token=wecom.token.reveal(),
        encoding_aes_key=wecom.encoding_aes_key.reveal(),
    )
    echo = f"wecombot-doctor-{secrets.token_hex(8)}"
    started = time.monotonic()
    try:
        proxy = proxy_url(url, calls="doctor's callback check", environ=environ)
    except ConfigError as exc:
        return Finding("callback", "skip", f"cannot call {url}: {exc}", (_PROXY_FIX,))
    options = client_options(None if proxy is None else Secret(proxy))
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, **options) as http:
            response = await http.get(url, params=builder.verify_url(echo))
    except httpx.TimeoutException:
        return Finding(
            "callback",
            "fail",
            f"{url} did not answer within {timeout_s:g} s",
            ("WeCom expects the URL verification answered within 1 s.", *_REACH),
        )
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        return Finding(
            "callback", "fail", f"cannot reach {url}: {reason}", (_unreachable(reason), *_REACH)
        )
    elapsed = time.monotonic() - started
    found = _judge_verification(url, path, echo, response, elapsed)
    private = _not_public(parts.hostname or "")
    if found.status == "ok" and private:
        return Finding(
            "callback",
            "warn",
            found.summary,
            (
                f"But {parts.hostname} is {private}: WeCom calls from its servers on the "
                "internet and cannot reach it. Give it the public URL of your proxy or "
                "ingress (with a publicly trusted certificate, for https).",
            ),
        )
    return found


def _unreachable(reason: str) -> str:
    """What to look at, from httpx's reason for a URL it could not reach."""
    low = reason.lower()
    if "wrong_version_number" in low or "wrong version number" in low:
        return (
            "The port does not speak TLS: an https:// URL pointed at the gateway's plain "
            "HTTP port, or at a proxy that does not terminate TLS there."
        )
    if "certificate" in low or "ssl" in low:
        return "The TLS certificate is not valid for that host: WeCom needs a publicly trusted one."
    return "Check that the host resolves publicly and the port is open."


def _not_public(host: str) -> str | None:
    """Why WeCom cannot reach ``host`` from the internet (None: it may)."""
    if host == "localhost" or host.endswith(".localhost"):
        return "this machine"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: where it resolves for WeCom is not knowable from here
    if address.is_loopback:
        return "this machine"
    if address.is_private or address.is_link_local:
        return "a private address"
    return None


_REACH = (
    "This check runs from here; WeCom calls from its servers on the internet, so run doctor "
    "from outside your network too, or rely on WeCom's own check when you save the URL.",
)


def _judge_verification(
    url: str, path: str, echo: str, response: httpx.Response, elapsed: float
) -> Finding:
    status = response.status_code
    body = response.text
    if status == 200 and body == echo:
        details: list[str] = []
        summary = f"{url} answered WeCom's URL verification with the echo ({elapsed:.2f} s)"
        if elapsed > 1.0:
            details.append("WeCom wants the answer within 1 s: this one was slow.")
        details.append(
            "Save this URL with the same Token and EncodingAESKey in 接收消息 → 设置API接收."
        )
        details.extend(_REACH)
        return Finding("callback", "warn" if elapsed > 1.0 else "ok", summary, tuple(details))
    if status == 200:
        return Finding(
            "callback",
            "fail",
            f"something else answers at {url}: 200, but not the echo",
            (
                f"It answered {clip(body)!r}. A proxy, ingress or login page may serve "
                "another app there; the gateway must get the request unchanged, query "
                "string included.",
            ),
        )
    if status in (301, 302, 303, 307, 308):
        return Finding(
            "callback",
            "fail",
            f"{url} redirects to {response.headers.get('location', '?')}",
            ("WeCom does not follow redirects: give it the final URL (https, if forced).",),
        )
    if status == 403:
        return Finding(
            "callback",
            "fail",
            f"the gateway at {url} refused the signature (403)",
            (
                "It verifies with another WECOM_TOKEN or WECOM_CORP_ID than this "
                "configuration, or its clock is off by more than GATEWAY_TIMESTAMP_WINDOW. "
                "Give the gateway exactly these settings, and check its time (NTP).",
            ),
        )
    if status == 400:
        return Finding(
            "callback",
            "fail",
            f"the gateway at {url} could not decrypt the echo (400)",
            (
                "Its WECOM_ENCODING_AES_KEY differs from this configuration's: give both the "
                "EncodingAESKey shown in 设置API接收.",
            ),
        )
    if status in (404, 405):
        return Finding(
            "callback",
            "fail",
            f"nothing serves the callback at {url} ({status})",
            (
                f"GATEWAY_CALLBACK_PATH is {path}: the URL must end with it, and the ingress "
                "or proxy must route it to the gateway.",
            ),
        )
    if status >= 500:
        return Finding(
            "callback",
            "fail",
            f"{url} answered {status}",
            (
                "A proxy in front answered for a gateway that is down or not ready: check "
                "the gateway's /readyz and logs.",
            ),
        )
    return Finding("callback", "fail", f"{url} answered {status}: {clip(body)!r}")


# ---------------------------------------------------------------- model


async def check_model(environ: Mapping[str, str], timeout_s: float) -> Finding:
    env = EnvReader(environ)
    model = ModelSettings.read(env, max_concurrency=1)
    if model.api_key is None and model.key_required:
        return Finding(
            "model",
            "fail",
            "OPENAI_API_KEY is unset (or empty) and LLM_REQUIRE_API_KEY=true: the llm "
            "does not start",
            ("Set OPENAI_API_KEY (in Kubernetes: the wecombot-secrets Secret, docs/deploy.md).",),
        )
    if model.api_key is not None and (
        problem := _proxy_problem(environ, model.base_url, MODEL_CALLS)
    ):
        return Finding("model", "fail", f"the llm would not start: {problem}", (_PROXY_FIX,))
    if env.problems:
        return Finding("model", "skip", _fix_first(env.problems))
    if model.api_key is None:
        return Finding(
            "model",
            "warn",
            "OPENAI_API_KEY is unset: offline mode, the llm answers with the OFFLINE echo "
            "model, not an LLM",
            (
                "Fine for trying things out. For real answers set OPENAI_API_KEY, and "
                "OPENAI_BASE_URL and OPENAI_MODEL for providers other than OpenAI "
                "(docs/providers.md).",
            ),
        )
    key = model.api_key.reveal()
    headers, params = provider_auth(model)  # as the llm authenticates
    # error_detail redacts what is registered: a proxy's 407 page quoting the password, or
    # the Proxy-Authorization header (base64), is cleaned as the llm cleans it.
    for secret in proxy_secrets(model.proxy):
        register_secret(secret)

    def detail_of(response: httpx.Response) -> str:
        # A provider or proxy may echo the key: never shown (as the llm cleans it).
        return clip(error_detail(response, key=key))

    async with httpx.AsyncClient(
        timeout=timeout_s,
        headers=headers,
        params=params,
        **client_options(model.proxy),  # the llm's proxy
    ) as http:
        try:
            listed = await http.get(f"{model.base_url}/models")
        except httpx.HTTPError as exc:
            return _model_unreachable(model.base_url, exc)
        if listed.status_code in (401, 403):
            return _key_refused(model.base_url, listed, detail_of(listed))
        ids = _model_ids(listed) if listed.status_code == 200 else []
        if model.model in ids:
            return Finding(
                "model", "ok", f"{model.base_url} answers, and lists the model {model.model}"
            )
        try:
            answer = await _one_token(http, model)
        except httpx.HTTPError as exc:
            return _model_unreachable(model.base_url, exc)
    status = answer.status_code
    if status == 200:
        return Finding(
            "model", "ok", f"{model.base_url} answered a one-token completion with {model.model}"
        )
    if status in (401, 403):
        return _key_refused(model.base_url, answer, detail_of(answer))
    detail = detail_of(answer)
    if status == 404:
        hint = f" It lists: {', '.join(ids[:8])}." if ids else ""
        return Finding(
            "model",
            "fail",
            f"{model.base_url} has no model {model.model!r} (404: {detail})",
            (
                "Check OPENAI_MODEL (Azure: the deployment name) and that OPENAI_BASE_URL "
                f"includes the API path (…/v1 for most providers).{hint}",
            ),
        )
    if status == 429:
        return Finding(
            "model",
            "fail",
            f"{model.base_url} is rate-limiting this key, or its quota is used up (429)",
            (detail, "Check the account's billing and limits with the provider."),
        )
    if status >= 500:
        return Finding(
            "model",
            "fail",
            f"{model.base_url} is failing ({status}: {detail})",
            ("The provider has a problem; the llm retries such errors within LLM_RETRY_BUDGET.",),
        )
    return Finding(
        "model", "fail", f"{model.base_url} refused a one-token completion ({status}: {detail})"
    )


async def _one_token(http: httpx.AsyncClient, model: ModelSettings) -> httpx.Response:
    """The cheapest real request: one token (again without the cap if it is refused)."""
    body: dict[str, Any] = {
        "model": model.model,
        "messages": [{"role": "user", "content": "ping"}],
        "max_tokens": 1,
        "stream": False,
    }
    url = f"{model.base_url}/chat/completions"
    response = await http.post(url, json=body)
    if response.status_code == 400:  # some models take max_completion_tokens only
        del body["max_tokens"]
        response = await http.post(url, json=body)
    return response


def _model_ids(response: httpx.Response) -> list[str]:
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        return []
    if not isinstance(data, list):
        return []
    return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]


def _key_refused(base_url: str, response: httpx.Response, detail: str) -> Finding:
    return Finding(
        "model",
        "fail",
        f"{base_url} refused OPENAI_API_KEY ({response.status_code}: {detail})",
        (
            "Check that the key belongs to this provider (a DeepSeek key does not work at "
            "api.openai.com), is not revoked, and may use the model. Azure classic "
            "deployments also need OPENAI_API_VERSION.",
        ),
    )


def _model_unreachable(base_url: str, exc: httpx.HTTPError) -> Finding:
    return Finding(
        "model",
        "fail",
        f"cannot reach {base_url} ({type(exc).__name__})",
        (
            "Check OPENAI_BASE_URL, DNS, the firewall and any proxy between this host and the "
            "provider (docs/providers.md).",
        ),
    )


# ---------------------------------------------------------------- entry points


async def diagnose(
    environ: Mapping[str, str],
    *,
    public_url: str | None = None,
    timeout_s: float = 10.0,
    unknown: Sequence[str] = (),
    public_url_given_as: str = "--public-url",
) -> Report:
    """Run every check against ``environ`` (no ./.env reading here: ``main`` does that,
    and finds the ``unknown`` names it sets, and where ``public_url`` came from)."""
    report = Report([check_settings(environ, unknown)], shown_as_set(environ, public_url))
    report.findings.append(await check_nats(environ, timeout_s))
    report.findings.append(await check_gettoken(environ, timeout_s))
    report.findings.append(
        await check_callback(environ, public_url, timeout_s, given_as=public_url_given_as)
    )
    report.findings.append(await check_model(environ, timeout_s))
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wecombot doctor",
        description="Check a real configuration (environment and ./.env) and explain each "
        "problem with its fix. Exit code 1 when a check fails.",
    )
    parser.add_argument(
        "--public-url",
        type=_public_url,
        help="the callback URL WeCom will call, e.g. https://bot.example.com/wecom/callback "
        "(default: $WECOMBOT_PUBLIC_URL; unset: that check is skipped)",
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=10.0, help="seconds per check (default: 10)"
    )
    return parser


def _public_url(text: str) -> str:
    """An argparse type: an http(s) URL (a bad argument exits 2, as any other; it was a
    failed check, exit 1, or no word at all while the WeCom settings were missing)."""
    problem = url_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{problem}, got {masked_url(text)!r}")
    return text


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0 (0, -1 or nan failed every
    check as a network timeout)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return value


# The settings holding a secret, by name. Their values are redacted from the whole report:
# each check cleans what it quotes, and this is for what a check did not expect (a page
# at the public URL dumping its environment, an errmsg quoting a request a new way).
SECRET_SETTINGS = (
    "WECOM_SECRET",
    "WECOM_TOKEN",
    "WECOM_ENCODING_AES_KEY",
    "OPENAI_API_KEY",
    "NATS_PASSWORD",
)
_PROXIES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")


def hold_secrets(environ: Mapping[str, str]) -> None:
    """Register every secret ``environ`` holds, as written, for ``redact``: the settings
    above, a password or token in NATS_URL, a proxy's password and its Basic
    credentials (the services register the same, each its own)."""
    for name in SECRET_SETTINGS:
        value = environ.get(name, "")
        register_secret(value)
        register_secret(value.strip())  # as the settings read it
    for credential in url_credentials(environ.get("NATS_URL", "")):
        register_secret(credential)
    for name in (*_PROXIES, *(n.lower() for n in _PROXIES)):
        if proxy := environ.get(name, "").strip():
            for secret in proxy_secrets(Secret(proxy)):
                register_secret(secret)


def shown_as_set(environ: Mapping[str, str], public_url: str | None) -> tuple[str, ...]:
    """What doctor shows of the settings as they are set, none of it secret: the URLs it
    checks (the model's base URL, the public URL, NATS_URL without credentials) and the
    model's name. A secret inside one (OPENAI_API_KEY=ollama, Ollama's placeholder, with
    OPENAI_BASE_URL=http://ollama:11434/v1) is not redacted there: the report said
    http://[REDACTED]:11434/v1. A URL with userinfo, a query or a fragment is not kept
    (doctor never shows it whole)."""
    env = EnvReader(environ)
    nats_url = env.optional("NATS_URL")
    found = [
        env.optional("OPENAI_BASE_URL"),
        env.optional("OPENAI_MODEL"),
        env.optional("WECOM_API_BASE"),
        public_url,
        None if nats_url is None else without_credentials(nats_url),
    ]
    shown: list[str] = []
    for value in found:
        if value and not any(c in value for c in "@?#"):
            shown += [value, value.rstrip("/")]
    return tuple(dict.fromkeys(s for s in shown if s))


def main(environ: Mapping[str, str], argv: Sequence[str] = (), out: TextIO | None = None) -> int:
    args = _parser().parse_args(list(argv))
    stream = out or sys.stdout
    env = dict(environ)
    unknown = misspelt(read_dotenv(Path(".env"), env))
    hold_secrets(env)
    public_url = args.public_url or EnvReader(env).optional("WECOMBOT_PUBLIC_URL")
    # argparse has refused a bad --public-url (exit 2); the setting's is a failed check
    given_as = "--public-url" if args.public_url else "WECOMBOT_PUBLIC_URL"
    print("wecombot doctor: checking the configuration in the environment and ./.env", file=stream)
    print("", file=stream)
    report = asyncio.run(
        diagnose(
            env,
            public_url=public_url,
            timeout_s=args.timeout,
            unknown=unknown,
            public_url_given_as=given_as,
        )
    )
    print(report.render(), file=stream, flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    import os

    sys.exit(main(os.environ, sys.argv[1:]))
