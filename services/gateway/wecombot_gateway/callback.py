"""Open a WeCom callback: check the query, the signature and the timestamp, decrypt, parse.

Pure (CPU only, no I/O, the clock is an argument), built once per process. With the
worked example of https://developer.work.weixin.qq.com/document/path/90968::

    >>> from multidict import MultiDict
    >>> corp = "wx5823bf96d3bd56c7"
    >>> crypto = WeComCrypto("QDG6eK", "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", corp)
    >>> opener = CallbackOpener(crypto, corp_id=corp, agent_id=218, app=f"{corp}-218", window_s=0)
    >>> query = MultiDict(
    ...     msg_signature="5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3",
    ...     timestamp="1409659589",
    ...     nonce="263014780",
    ...     echostr="P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3"
    ...     "zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ==",
    ... )
    >>> opener.url_check(CallbackQuery.parse(query, url_check=True), now=0.0)
    b'1616140317555161061'

Order, from the cheapest refusal to the dearest: query shape → (envelope XML) →
signature → replay window → decrypt + receive_id → message fields. The signature comes
before the timestamp so an unsigned request is never told its timestamp is stale.

Protocol: https://developer.work.weixin.qq.com/document/path/90238 (receiving),
https://developer.work.weixin.qq.com/document/path/90968 (crypto).
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import MultiMapping

from wecombot_common.crypto import WeComCrypto
from wecombot_common.events import MessageReceived

from .errors import InvalidQuery, StaleTimestamp
from .parse import parse_envelope, parse_message

__all__ = ["CallbackOpener", "CallbackQuery", "check_fresh"]

_SIGNED = ("msg_signature", "timestamp", "nonce")
_URL_CHECK = (*_SIGNED, "echostr")
_MAX_TIMESTAMP_DIGITS = 11
_UTF8_BOM = "\ufeff".encode()


@dataclass(frozen=True, slots=True)
class CallbackQuery:
    """The query string of a callback: each parameter exactly once, none empty.

    Other parameters are ignored: they are not signed, so they cannot change what we
    accept, and refusing them would take callbacks down if WeCom ever adds one.
    """

    msg_signature: str
    timestamp: str
    nonce: str
    echostr: str | None = None

    @classmethod
    def parse(cls, query: MultiMapping[str], *, url_check: bool) -> CallbackQuery:
        names = _URL_CHECK if url_check else _SIGNED
        values = [_single(query, name) for name in names]
        timestamp = values[1]
        if (
            not (timestamp.isascii() and timestamp.isdigit())
            or len(timestamp) > _MAX_TIMESTAMP_DIGITS
        ):
            raise InvalidQuery(f"timestamp {timestamp[:20]!r} is not a Unix time in seconds")
        echostr = None
        if url_check:
            # The query is already percent-decoded, but an unencoded '+' arrives as ' ';
            # base64 never contains a space, so mapping it back is lossless.
            echostr = values[3].replace(" ", "+")
        return cls(msg_signature=values[0], timestamp=timestamp, nonce=values[2], echostr=echostr)


def _single(query: MultiMapping[str], name: str) -> str:
    values = query.getall(name, [])
    if not values:
        raise InvalidQuery(f"query parameter {name} is missing")
    if len(values) > 1:
        raise InvalidQuery(f"query parameter {name} is repeated {len(values)} times")
    if not values[0]:
        raise InvalidQuery(f"query parameter {name} is empty")
    return values[0]


def check_fresh(timestamp: str, *, now: float, window_s: int) -> None:
    """Refuse a signed timestamp more than ``window_s`` away from ``now`` (0: no check).

    WeCom does not document a window; a signed request replayed later is the threat.

    >>> check_fresh("1000", now=1200.0, window_s=300)
    >>> check_fresh("1000", now=1301.0, window_s=300)
    Traceback (most recent call last):
    ...
    wecombot_gateway.errors.StaleTimestamp: timestamp is 301 s from our clock (window ±300 s)
    """
    if window_s <= 0:
        return
    skew = abs(now - int(timestamp))
    if skew > window_s:
        raise StaleTimestamp(f"timestamp is {skew:.0f} s from our clock (window ±{window_s} s)")


class CallbackOpener:
    """Verifies and decrypts callbacks for one app; stateless after construction."""

    __slots__ = ("_agent_id", "_app", "_corp_id", "_crypto", "_window_s")

    def __init__(
        self, crypto: WeComCrypto, *, corp_id: str, agent_id: int, app: str, window_s: int
    ) -> None:
        self._crypto = crypto
        self._corp_id = corp_id
        self._agent_id = agent_id
        self._app = app
        self._window_s = window_s

    def url_check(self, query: CallbackQuery, *, now: float) -> bytes:
        """The GET URL verification: the decrypted echostr, to be answered verbatim.

        A message's ``Encrypt`` is signed exactly as an echostr is (path/90968), so a
        POST seen on its way (a proxy's or WAF's body log) could be sent back as a GET
        within the replay window, and its message would be answered decrypted. WeCom's
        echostr is a random string, never XML: a plaintext that is XML is refused (400).
        XML is looked for after what the message parser skips before ``<xml>``: a UTF-8
        BOM, then whitespace.
        """
        assert query.echostr is not None, "parse the query with url_check=True"
        self._crypto.verify_signature(
            query.msg_signature, query.timestamp, query.nonce, query.echostr
        )
        check_fresh(query.timestamp, now=now, window_s=self._window_s)
        plaintext = self._crypto.decrypt(query.echostr)
        if plaintext.removeprefix(_UTF8_BOM).lstrip()[:1] == b"<":
            raise InvalidQuery("echostr decrypts to XML: a message's Encrypt sent as a URL check")
        return plaintext

    def message(self, query: CallbackQuery, body: bytes, *, now: float) -> MessageReceived:
        """A POSTed message or event, verified, decrypted and parsed."""
        envelope = parse_envelope(body)
        self._crypto.verify_signature(
            query.msg_signature, query.timestamp, query.nonce, envelope.encrypt
        )
        check_fresh(query.timestamp, now=now, window_s=self._window_s)
        plaintext = self._crypto.decrypt(envelope.encrypt)
        return parse_message(
            plaintext, corp_id=self._corp_id, agent_id=self._agent_id, app=self._app
        )
