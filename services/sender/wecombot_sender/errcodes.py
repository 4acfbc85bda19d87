"""WeCom ``message/send`` outcomes sorted into what to do about them. Pure.

Codes from https://developer.work.weixin.qq.com/document/path/90313 (global error codes)
and path/90236 (message/send)::

    >>> [str(classify(code)) for code in (45009, 42001, 81013)]
    ['retryable', 'token', 'permanent']
    >>> explain(60020)
    "this server's IP is not among the app's trusted IPs (企业可信IP) (errcode 60020)"

- retryable: WeCom is busy or limiting us, or the call did not get a WeCom answer (HTTP
  errors, timeouts, connection errors): the same request may succeed later.
- token: the access_token was refused; invalidate it and retry once with a new one.
- permanent: any other non-zero code; sending the same message again cannot succeed.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BUSY",
    "DOCUMENTED",
    "EMPTY_CONTENT",
    "ErrorClass",
    "classify",
    "explain",
]

BUSY = -1
EMPTY_CONTENT = 44004


class ErrorClass(StrEnum):
    RETRYABLE = "retryable"
    TOKEN = "token"  # noqa: S105 (a category, not a password)
    PERMANENT = "permanent"


# 45011: "API调用太频繁，请稍候再试" (the global error codes, path/90313): a rate limit
_RETRYABLE = frozenset({BUSY, 45009, 45011, 45033})
_TOKEN = frozenset({40014, 41001, 42001})

_REASONS: dict[int, str] = {
    BUSY: "WeCom is busy",
    40003: "the recipient UserID is not valid",
    40014: "the access_token is invalid",
    41001: "the access_token is missing",
    42001: "the access_token has expired",
    EMPTY_CONTENT: "the reply is empty",
    45002: "the reply is too large for one message",
    45009: "the app called the WeCom API too often",
    45011: "WeCom asks the app to call less often",
    45033: "too many concurrent calls to the WeCom API",
    60020: "this server's IP is not among the app's trusted IPs (企业可信IP)",
    81013: "the recipient is not a member the app can reach (left, or outside its visible range)",
    82001: "no valid recipient",
    301002: "the access_token belongs to another app (agentid mismatch)",
}

# the codes this module knows by name: each keeps its own metric series (wecom.py)
DOCUMENTED = frozenset(_REASONS)


def classify(errcode: int) -> ErrorClass:
    """What to do about a non-zero ``errcode`` from ``message/send``."""
    if errcode in _RETRYABLE:
        return ErrorClass.RETRYABLE
    if errcode in _TOKEN:
        return ErrorClass.TOKEN
    return ErrorClass.PERMANENT


def explain(errcode: int, errmsg: str = "") -> str:
    """A plain-words reason for operators and for ``DeliveryFailed.reason``."""
    known = _REASONS.get(errcode)
    if known is not None:
        return f"{known} (errcode {errcode})"
    detail = f": {errmsg}" if errmsg else ""
    return f"WeCom refused the message (errcode {errcode}{detail})"
