"""Why the gateway refuses a callback: one typed error per reason, no HTTP in sight.

::

    PermanentError                     (wecombot_common.errors: retrying cannot help)
    └── CallbackRejected               .reason (safe to log), .code (official -400xx or None)
        ├── InvalidQuery               a query parameter is missing, repeated or malformed
        ├── UnsupportedMediaType       the body is declared as something other than XML
        ├── UnknownExpectation         an Expect header other than 100-continue
        ├── BodyTooLarge               the body exceeds GATEWAY_MAX_BODY_BYTES
        ├── UnreadableBody             broken framing or encoding, or the client went away
        │   └── BodyTimeout            the body did not arrive within GATEWAY_BODY_TIMEOUT
        ├── StaleTimestamp             the signed timestamp is outside the replay window
        ├── MalformedXml               not well-formed XML, or not the expected shape
        ├── UnsafeXml                  DTD, entity or external reference (XXE, billion laughs)
        ├── InvalidMessage             a required field is missing or malformed; not UTF-8
        └── WrongRecipient             ToUserName is not our CorpID, or AgentID not ours

Crypto failures are :class:`wecombot_common.crypto.CryptoError` subclasses and a broker
that does not confirm an append is :class:`wecombot_common.bus.AppendUnavailable` ("retry
later"). Only :mod:`wecombot_gateway.app` turns any of them into an HTTP status.

Reasons never contain secrets or message content, only field names and short values.
"""

from __future__ import annotations

from wecombot_common.errors import PermanentError

__all__ = [
    "BodyTimeout",
    "BodyTooLarge",
    "CallbackRejected",
    "InvalidMessage",
    "InvalidQuery",
    "MalformedXml",
    "NoSender",
    "StaleTimestamp",
    "UnknownExpectation",
    "UnreadableBody",
    "UnsafeXml",
    "UnsupportedMediaType",
    "WrongRecipient",
]


class CallbackRejected(PermanentError):
    """A callback that can never be accepted as sent."""

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class InvalidQuery(CallbackRejected):
    """msg_signature / timestamp / nonce / echostr missing, repeated or malformed."""


class UnsupportedMediaType(CallbackRejected):
    """Content-Type says JSON, a form, multipart…: not a WeCom XML callback."""


class UnknownExpectation(CallbackRejected):
    """``Expect`` names something other than ``100-continue`` (RFC 9110 §10.1.1: 417)."""


class BodyTooLarge(CallbackRejected):
    """The body is larger than the configured limit (checked before and while reading)."""


class UnreadableBody(CallbackRejected):
    """The body could not be read: bad chunking or compression, or the peer disconnected."""


class BodyTimeout(UnreadableBody):
    """The body stopped arriving (a slow or stalled client): its connection is freed."""


class StaleTimestamp(CallbackRejected):
    """The signed timestamp is too far from our clock: a replayed request."""


class MalformedXml(CallbackRejected):
    """Not well-formed XML, or a required element is missing from the envelope."""


class UnsafeXml(CallbackRejected):
    """A DTD, entity declaration or external reference: refused before any expansion."""


class InvalidMessage(CallbackRejected):
    """The decrypted message is not UTF-8, or a required field is missing or malformed."""


class NoSender(CallbackRejected):
    """An event with no FromUserName (微信客服's kf_msg_or_event, path/94670): a valid
    callback that belongs to no conversation. Answered 200 and not stored: refused, WeCom
    would retry it in vain."""


class WrongRecipient(CallbackRejected):
    """The decrypted message is addressed to another corporation, or to another app of
    ours. ``setting``: the one of ours it does not match (WECOM_CORP_ID, WECOM_AGENT_ID)."""

    def __init__(self, reason: str, *, setting: str) -> None:
        super().__init__(reason)
        self.setting = setting
