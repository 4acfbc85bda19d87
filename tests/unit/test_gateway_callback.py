"""CallbackOpener's order of checks: the signature before the replay window.

An unsigned (forged) request must learn nothing about our clock: with a wrong
signature it is refused for the signature whatever its timestamp; only a correctly
signed request can be refused as stale.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from multidict import MultiDict

from wecombot_common.crypto import SignatureError, generate_encoding_aes_key, generate_token
from wecombot_common.events import MessageReceived, TextPayload
from wecombot_common.sim.callbacks import CallbackBuilder
from wecombot_gateway.callback import CallbackOpener, CallbackQuery
from wecombot_gateway.errors import InvalidQuery, StaleTimestamp
from wecombot_gateway.parse import parse_message

CORP = "wwcallbackunit01"
AGENT = 1000002
APP = f"{CORP}-{AGENT}"
WINDOW_S = 300
SENT_AT = 1_700_000_000  # the signed timestamp of every request here
FRESH = SENT_AT + WINDOW_S  # our clock at the edge of the window: still accepted
STALE = SENT_AT + WINDOW_S + 1  # one second past it: a replay
FORGED = "0" * 40

WECOM = CallbackBuilder(
    corp_id=CORP,
    agent_id=AGENT,
    token=generate_token(),
    encoding_aes_key=generate_encoding_aes_key(),
)
OPENER = CallbackOpener(WECOM.crypto, corp_id=CORP, agent_id=AGENT, app=APP, window_s=WINDOW_S)


def _url_check(*, now: float, forged: bool) -> object:
    """The GET URL verification, signed at SENT_AT (or with a forged signature)."""
    ts, nonce = str(SENT_AT), "1372623149"
    echostr = WECOM.crypto.encrypt(b"1616140317555161061")
    signature = FORGED if forged else WECOM.crypto.signature(ts, nonce, echostr)
    query = MultiDict(msg_signature=signature, timestamp=ts, nonce=nonce, echostr=echostr)
    return OPENER.url_check(CallbackQuery.parse(query, url_check=True), now=now)


def _post(*, now: float, forged: bool) -> object:
    """A POSTed text message, signed at SENT_AT (or with a forged signature)."""
    callback = WECOM.wrap(WECOM.text("zhang.san", "你好").inner_xml, timestamp=SENT_AT)
    params = dict(callback.query, msg_signature=FORGED) if forged else callback.query
    query = CallbackQuery.parse(MultiDict(params), url_check=False)
    return OPENER.message(query, callback.body, now=now)


OPEN: dict[str, Callable[..., object]] = {"GET url_check": _url_check, "POST message": _post}


def test_a_signed_request_inside_the_window_is_opened() -> None:
    assert _url_check(now=FRESH, forged=False) == b"1616140317555161061"
    message = _post(now=FRESH, forged=False)
    assert isinstance(message, MessageReceived)
    assert (message.app, message.from_user, message.payload) == (
        APP,
        "zhang.san",
        TextPayload(content="你好"),
    )


def test_a_messages_encrypt_sent_back_as_a_url_check_is_not_decrypted() -> None:
    """A POST's query and Encrypt are signed as a GET's echostr is: replayed as one (a
    POST seen in a proxy's body log), the gateway answered the message decrypted."""
    callback = WECOM.wrap(WECOM.text("zhang.san", "工资单").inner_xml, timestamp=SENT_AT)
    encrypt = re.search(rb"<Encrypt><!\[CDATA\[(.+?)]]>", callback.body)
    assert encrypt is not None
    query = MultiDict(callback.query, echostr=encrypt[1].decode())
    with pytest.raises(InvalidQuery, match="echostr decrypts to XML"):
        OPENER.url_check(CallbackQuery.parse(query, url_check=True), now=FRESH)


@pytest.mark.parametrize(
    "before", [b"\n", b"\r\n", b" \t", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"], ids=repr
)
def test_an_echostr_decrypting_to_xml_after_whitespace_is_refused_too(before: bytes) -> None:
    """XML is XML with a line break or a UTF-8 BOM before it (the message parser reads
    it as a message): such a signed plaintext is a message's, not a URL check's random
    string, and is not answered."""
    plaintext = before + WECOM.text("zhang.san", "工资单").inner_xml.encode()
    assert parse_message(plaintext, corp_id=CORP, agent_id=AGENT, app=APP).from_user == (
        "zhang.san"
    )
    ts, nonce = str(SENT_AT), "1372623149"
    echostr = WECOM.crypto.encrypt(plaintext)
    signature = WECOM.crypto.signature(ts, nonce, echostr)
    query = MultiDict(msg_signature=signature, timestamp=ts, nonce=nonce, echostr=echostr)
    with pytest.raises(InvalidQuery, match="echostr decrypts to XML"):
        OPENER.url_check(CallbackQuery.parse(query, url_check=True), now=FRESH)


@pytest.mark.parametrize("open_", OPEN.values(), ids=OPEN.keys())
def test_a_signed_stale_request_is_refused_as_stale(open_: Callable[..., object]) -> None:
    with pytest.raises(StaleTimestamp, match=r"301 s from our clock \(window ±300 s\)"):
        open_(now=STALE, forged=False)


@pytest.mark.parametrize("open_", OPEN.values(), ids=OPEN.keys())
@pytest.mark.parametrize("now", [FRESH, STALE], ids=["fresh", "stale"])
def test_a_forged_request_is_refused_for_its_signature_whatever_its_timestamp(
    open_: Callable[..., object], now: float
) -> None:
    """Stale and forged: the signature error, never StaleTimestamp (which would tell an
    unsigned caller how far its timestamp is from our clock)."""
    with pytest.raises(SignatureError):
        open_(now=now, forged=True)
