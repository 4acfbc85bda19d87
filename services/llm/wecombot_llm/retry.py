"""When to try a model call again, and how long to wait first. Pure.

Retried: HTTP 408, 429 and 5xx, timeouts, connection errors and answers that cannot be
read. Everything else (400, 401, 403, 404, 422 …, or a URL that cannot be sent) means
the request itself is wrong and is never retried.

Waits are exponential with full jitter (``uniform(0, min(cap, base·2^(n-1)))``, so many
replicas hit by the same outage spread their retries), but never shorter than what the
server asked for in ``Retry-After`` (seconds or an HTTP date) or OpenAI's
``retry-after-ms``. The caller stops once the next wait would end after its budget.

    >>> parse_retry_after("2")
    2.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT",
    ...                   now=datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC))
    30.0
    >>> parse_retry_after("soon") is None
    True
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["is_retryable_status", "next_delay", "parse_retry_after", "retry_after_of"]

BASE_DELAY_S = 0.5
MAX_DELAY_S = 8.0


def is_retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None if absent or malformed."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # a year past 9999: Overflow
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry_after_of(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """The wait a response asks for: ``retry-after-ms`` first, then ``Retry-After``."""
    millis = parse_retry_after(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    return parse_retry_after(headers.get("retry-after"), now=now)


def next_delay(attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based)."""
    backoff = rng.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (attempt - 1)))
    return backoff if retry_after is None else max(retry_after, backoff)
