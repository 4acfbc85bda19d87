"""The sender's errors, all under the shared tree (``wecombot_common.errors``)::

    WecombotError
    └── SendError          message/send did not deliver; .errcode, .reason
        ├── SendRetryable  TransientError: WeCom busy (-1, 45009, 45011, 45033), HTTP error,
        │                  timeout, connection error (errcode -1 when WeCom said nothing);
        │                  .maybe_delivered when WeCom may have accepted it regardless
        ├── TokenRejected  TransientError: 40014, 41001, 42001; refresh and retry once
        └── SendRejected   PermanentError: any other errcode; WeCom will never take it

Reasons never contain the request URL: it carries the access_token.
"""

from __future__ import annotations

from wecombot_common.errors import PermanentError, TransientError, WecombotError

__all__ = ["SendError", "SendRejected", "SendRetryable", "TokenRejected"]


class SendError(WecombotError):
    def __init__(self, errcode: int, reason: str) -> None:
        super().__init__(reason)
        self.errcode = errcode
        self.reason = reason


class SendRetryable(SendError, TransientError):
    """The same request may succeed later. ``maybe_delivered``: no answer came after the
    request went out (a read timeout, a dropped connection, a front end's 5xx), so WeCom
    may have accepted it; a retry asks WeCom to drop it as a duplicate."""

    def __init__(self, errcode: int, reason: str, *, maybe_delivered: bool = False) -> None:
        super().__init__(errcode, reason)
        self.maybe_delivered = maybe_delivered


class TokenRejected(SendError, TransientError):
    """WeCom refused the access_token; a fresh one may work."""


class SendRejected(SendError, PermanentError):
    """WeCom refused this message for good."""
