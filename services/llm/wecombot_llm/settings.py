"""The llm service's settings, read from the environment once at start-up.

    >>> s = LlmSettings.from_env({"OPENAI_API_KEY": "sk-test", "OPENAI_MODEL": "deepseek-chat",
    ...                           "OPENAI_BASE_URL": "https://api.deepseek.com/v1"})
    >>> s.offline, s.model.model
    (False, 'deepseek-chat')

Without ``OPENAI_API_KEY`` the service answers with the offline echo model (no network),
so the whole pipeline can run in a sandbox, unless ``LLM_REQUIRE_API_KEY=true`` (as the
Kubernetes manifests set): then it does not start. docs/providers.md lists the three
settings for each provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from wecombot_common.settings import (
    EnvReader,
    LogSettings,
    NatsSettings,
    Secret,
    health_host,
    health_port,
    proxy_secrets,
)
from wecombot_common.topology import is_user_id

from .gate import GatePolicy

__all__ = ["LlmSettings", "ModelSettings", "ReplyPolicy"]

_PROMPT_HEAD = (
    "You are a helpful assistant inside WeCom (企业微信). Answer in the language the user "
    "writes in, concisely and accurately, and say so when you are not sure. "
)
# The default prompt follows SENDER_MESSAGE_TYPE (the same setting the sender reads):
# a text message shows Markdown as typed, and a markdown one renders only a subset of it
# (path/90236; the sender's wecom.py).
DEFAULT_SYSTEM_PROMPT = _PROMPT_HEAD + (
    "Write plain text: WeCom shows Markdown as typed, so no **bold**, # headings, tables "
    "or ``` code fences; use short paragraphs and numbered lines instead."
)
MARKDOWN_SYSTEM_PROMPT = _PROMPT_HEAD + (
    "Format with the Markdown WeCom renders: # headings, **bold**, [links](url), "
    "`inline code` and > quotes. It shows tables and ``` code fences as typed: avoid them."
)
DEFAULT_APOLOGY = "抱歉，我暂时无法回答这个问题，请稍后再试。"


MODEL_CALLS = "the model calls"


@dataclass(frozen=True)
class ModelSettings:
    """How to reach an OpenAI-compatible chat completions endpoint."""

    api_key: Secret | None
    base_url: str
    model: str
    api_version: str | None
    temperature: float | None
    request_timeout_s: float
    retry_budget_s: float
    max_connections: int
    key_required: bool = False  # LLM_REQUIRE_API_KEY: no offline model
    proxy: Secret | None = None  # the environment's, for base_url (None: direct)

    @classmethod
    def read(cls, env: EnvReader, *, max_concurrency: int) -> ModelSettings:
        temperature: float | None = None
        if env.present("LLM_TEMPERATURE"):
            temperature = env.number("LLM_TEMPERATURE", 1.0, float, "a number", 0.0, 2.0)
        key_required = _requires_api_key(env)
        api_key = _api_key(env, required=key_required)
        base_url = env.url(
            "OPENAI_BASE_URL",
            "https://api.openai.com/v1",
            credentials="the key goes in OPENAI_API_KEY",
        )
        return cls(
            key_required=key_required,
            api_key=api_key,
            base_url=base_url,
            # the offline model calls nothing
            proxy=None if api_key is None else env.proxy_for(base_url, MODEL_CALLS),
            model=env.text("OPENAI_MODEL", "gpt-4o-mini"),
            api_version=env.optional("OPENAI_API_VERSION"),
            temperature=temperature,
            request_timeout_s=env.seconds("LLM_REQUEST_TIMEOUT", 60.0, minimum=1.0, maximum=900),
            retry_budget_s=env.seconds("LLM_RETRY_BUDGET", 90.0, minimum=0.0, maximum=3600),
            # Every in-flight message may hold one connection; a few spare for retries.
            max_connections=max_concurrency + 8,
        )


def _requires_api_key(env: EnvReader) -> bool:
    """LLM_REQUIRE_API_KEY=true (the Kubernetes manifests set it): no offline echo model.
    A Secret whose OPENAI_API_KEY is empty (a key forgotten when it was made) otherwise
    started an llm that echoed every user's message back to them, in production."""
    return env.choice("LLM_REQUIRE_API_KEY", "false", ("false", "true")) == "true"


def _api_key(env: EnvReader, *, required: bool) -> Secret | None:
    """OPENAI_API_KEY, or None (offline; a problem when ``required``). It goes in a header
    (``Authorization: Bearer`` or ``api-key``), so printable ASCII without spaces: anything
    else made building the client raise UnicodeEncodeError. The problem names the
    character, never the key."""
    hint = "LLM_REQUIRE_API_KEY=true refuses the offline echo model; empty counts as unset"
    key = env.secret("OPENAI_API_KEY", required=required, hint=hint)
    if not key:
        return None
    bad = next(((i, c) for i, c in enumerate(key.reveal(), 1) if not "!" <= c <= "~"), None)
    if bad is not None:
        position, char = bad
        what = "a space" if char == " " else f"U+{ord(char):04X}"
        env.check(
            False,
            "OPENAI_API_KEY must be printable ASCII without spaces (it is sent in an HTTP "
            f"header): character {position} is {what}",
        )
    return key


@dataclass(frozen=True)
class ReplyPolicy:
    """What the conversation logic needs: the prompt, the history limits, fixed texts,
    and who may ask how often (``user_rate_per_minute`` 0 = no limit; ``allowed_users``
    None = everyone, else case-folded UserIDs; see gate.py)."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_turns: int = 20
    max_context_tokens: int = 8000
    welcome_message: str | None = None
    apology_message: str = DEFAULT_APOLOGY
    user_rate_per_minute: int = 10
    allowed_users: frozenset[str] | None = None
    # WECOMBOT_HISTORY_MAX_AGE: older turns have left the stream; None = keep all
    history_max_age_s: float | None = None

    @property
    def gate(self) -> GatePolicy:
        return GatePolicy(
            rate_per_minute=self.user_rate_per_minute, allowed_users=self.allowed_users
        )

    @classmethod
    def read(cls, env: EnvReader) -> ReplyPolicy:
        return cls(
            system_prompt=env.text("LLM_SYSTEM_PROMPT", _default_prompt(env)),
            max_turns=env.integer("LLM_MAX_TURNS", 20, minimum=0, maximum=1000),
            max_context_tokens=env.integer(
                "LLM_MAX_CONTEXT_TOKENS", 8000, minimum=100, maximum=10_000_000
            ),
            welcome_message=env.optional("LLM_WELCOME_MESSAGE"),
            apology_message=env.text("LLM_APOLOGY_MESSAGE", DEFAULT_APOLOGY),
            # WeCom delivers at most 30 messages a minute to one member (path/90454).
            user_rate_per_minute=env.integer(
                "LLM_USER_RATE_PER_MINUTE", 10, minimum=0, maximum=1000
            ),
            allowed_users=_allowed_users(env),
        )


def _default_prompt(env: EnvReader) -> str:
    """The default system prompt for what the replies go out as (SENDER_MESSAGE_TYPE)."""
    markdown = env.choice("SENDER_MESSAGE_TYPE", "text", ("text", "markdown")) == "markdown"
    return MARKDOWN_SYSTEM_PROMPT if markdown else DEFAULT_SYSTEM_PROMPT


def _allowed_users(env: EnvReader) -> frozenset[str] | None:
    """LLM_ALLOWED_USERS: comma-separated UserIDs (case-insensitive, as in WeCom)."""
    raw = env.optional("LLM_ALLOWED_USERS")
    if raw is None:
        return None
    users = [u.strip() for u in raw.split(",") if u.strip()]
    bad = [u for u in users if not is_user_id(u)]
    env.check(
        not bad,
        f"LLM_ALLOWED_USERS must be comma-separated WeCom UserIDs, got {', '.join(bad)[:200]!r}",
    )
    env.check(bool(users), "LLM_ALLOWED_USERS names no UserID (unset it to allow everyone)")
    return frozenset(u.casefold() for u in users)


@dataclass(frozen=True)
class LlmSettings:
    nats: NatsSettings
    log: LogSettings
    health_host: str
    health_port: int
    model: ModelSettings
    policy: ReplyPolicy
    max_concurrency: int
    ack_wait_s: float
    max_deliver: int
    order_wait_s: float
    shutdown_grace_s: float
    cache_mb: int = 64  # the conversations a replica keeps in memory between messages

    @property
    def offline(self) -> bool:
        """No API key: answer with the offline echo model."""
        return self.model.api_key is None

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Values the log pipeline must redact wherever they appear."""
        key = (self.model.api_key,) if self.model.api_key is not None else ()
        return (*key, *proxy_secrets(self.model.proxy), *self.nats.secrets)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> LlmSettings:
        """Read and validate every setting; ConfigError names each bad variable."""
        env = EnvReader(environ)
        concurrency = env.integer("LLM_MAX_CONCURRENCY", 64, minimum=1, maximum=10_000)
        nats = NatsSettings.read(env)
        settings = cls(
            nats=nats,
            log=LogSettings.read(env),
            health_host=health_host(env),
            health_port=health_port(env, 8081),
            model=ModelSettings.read(env, max_concurrency=concurrency),
            policy=replace(ReplyPolicy.read(env), history_max_age_s=nats.history_max_age_s),
            max_concurrency=concurrency,
            ack_wait_s=env.seconds("LLM_ACK_WAIT", 30.0, minimum=1.0, maximum=3600),
            max_deliver=env.integer("LLM_MAX_DELIVER", 10, minimum=1, maximum=1000),
            order_wait_s=env.seconds("LLM_ORDER_WAIT", 60.0, minimum=0.0, maximum=3600),
            # In-flight model calls get this long to finish on SIGTERM, then they are
            # handed back to another replica. Keep it below the pod's grace period.
            shutdown_grace_s=env.seconds("LLM_SHUTDOWN_GRACE", 20.0, minimum=0.0, maximum=600),
            cache_mb=env.integer("LLM_CACHE_MB", 64, minimum=1, maximum=1 << 20),
        )
        env.raise_if_invalid()
        return settings
