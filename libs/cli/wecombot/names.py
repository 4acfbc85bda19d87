"""The names of wecombot's settings, read off the services' own loaders, to find a
misspelt one in ``./.env``: ``LLM_MAX_CONCURENCY=8`` is no value a service refuses, just
one nobody reads, and the default applies in silence. ``wecombot dev`` and ``doctor`` say
so, with the name meant::

    >>> misspelt({"LLM_MAX_CONCURENCY": "8", "LLM_MAX_TURNS": "4", "EDITOR": "vi"})
    ['./.env sets LLM_MAX_CONCURENCY, which is no setting (LLM_MAX_CONCURRENCY?): it does nothing']

Only names with one of wecombot's prefixes, and only from ``./.env``: the environment of
a pod holds others of the same shape (Kubernetes adds ``NATS_SERVICE_HOST`` and the like
for a Service named ``nats``).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Iterable, Iterator, Mapping

from wecombot_common.errors import ConfigError
from wecombot_common.runtime import event_loop_choice
from wecombot_gateway.settings import GatewaySettings
from wecombot_llm.settings import LlmSettings
from wecombot_sender.settings import SenderSettings
from wecombot_token.settings import TokenSettings

__all__ = ["PREFIXES", "known_settings", "misspelt"]

PREFIXES = (
    "WECOM_",
    "WECOMBOT_",
    "OPENAI_",
    "LLM_",
    "SENDER_",
    "TOKEN_",
    "GATEWAY_",
    "NATS_",
    "LOG_",
)
# Read by the operator commands (dev, doctor), not by a service's loader.
_COMMANDS = ("WECOMBOT_CONSOLE_PORT", "WECOMBOT_DATA_DIR", "WECOMBOT_PUBLIC_URL")
# What makes a loader read further: a model key (its provider's settings), a NATS user
# (its password), an app (its WeCom settings past the first missing one).
_FURTHER = {
    "OPENAI_API_KEY": "sk-names",
    "NATS_USER": "names",
    "WECOM_CORP_ID": "wwnames",
    "WECOM_AGENT_ID": "1000002",
    "WECOM_SECRET": "names-secret",
}


class _Reads(Mapping[str, str]):
    """An environment that remembers every name asked of it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self.asked.add(name)
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@functools.cache
def known_settings() -> frozenset[str]:
    """Every name a service's loader, or an operator command, reads."""
    asked: set[str] = set(_COMMANDS)
    for values in ({}, _FURTHER):
        for load in (
            GatewaySettings.from_env,
            LlmSettings.from_env,
            SenderSettings.from_env,
            TokenSettings.from_env,
            event_loop_choice,
        ):
            reads = _Reads(values)
            with contextlib.suppress(ConfigError):  # missing values are asked all the same
                load(reads)
            asked |= reads.asked
    return frozenset(name for name in asked if name.startswith(PREFIXES))


def misspelt(names: Iterable[str]) -> list[str]:
    """What to say of each of ``names`` (``./.env``'s) that looks like a setting and is
    none, with the setting it most likely means when one is close."""
    known = known_settings()
    said = []
    for name in names:
        # Names are case-sensitive: ``openai_api_key`` is none either. In another case
        # only one close to a setting is said: ``log_file`` may be another program's.
        upper = name.upper()
        if upper.startswith(PREFIXES) and name not in known:
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
            if not close and name != upper:
                continue
            meant = f" ({close[0]}?)" if close else ""
            said.append(f"./.env sets {name}, which is no setting{meant}: it does nothing")
    return said
