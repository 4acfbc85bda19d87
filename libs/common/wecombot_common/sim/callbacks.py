"""Build WeCom callbacks exactly as WeCom does: inner XML, encrypted, signed, wrapped.

Used by everything that plays WeCom towards our gateway — the end-to-end tests, the
load generator, the chaos suite and the sandbox console::

    >>> import re
    >>> from wecombot_common.crypto import generate_encoding_aes_key
    >>> wecom = CallbackBuilder(corp_id="ww1", agent_id=1000002, token="tok",
    ...                         encoding_aes_key=generate_encoding_aes_key())
    >>> cb = wecom.text("zhang.san", "你好")
    >>> sorted(cb.query), cb.body[:14]
    (['msg_signature', 'nonce', 'timestamp'], b'<xml><ToUserNa')
    >>> encrypt = re.search(r"<Encrypt><!\\[CDATA\\[(.+?)]]>", cb.body.decode())[1]
    >>> wecom.crypto.verify_signature(
    ...     cb.query["msg_signature"], cb.query["timestamp"], cb.query["nonce"], encrypt)
    >>> wecom.crypto.decrypt(encrypt).decode() == cb.inner_xml
    True

Formats per https://developer.work.weixin.qq.com/document/path/90238 (receiving) and
path/90239 (message types); crypto per path/90968.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from xml.sax.saxutils import escape

from wecombot_common.crypto import WeComCrypto

__all__ = ["Callback", "CallbackBuilder"]


@dataclass(frozen=True)
class Callback:
    query: dict[str, str]
    body: bytes
    msg_id: str | None
    inner_xml: str


def _cdata(value: str) -> str:
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


class CallbackBuilder:
    def __init__(self, *, corp_id: str, agent_id: int, token: str, encoding_aes_key: str) -> None:
        self.corp_id = corp_id
        self.agent_id = agent_id
        self.crypto = WeComCrypto(token, encoding_aes_key, corp_id)
        # MsgIds are 64-bit; start high and random so runs never collide in a store.
        self._ids = itertools.count(secrets.randbits(40) << 20)

    def next_msg_id(self) -> str:
        return str(next(self._ids))

    def wrap(self, inner_xml: str, *, timestamp: int | None = None) -> Callback:
        """Encrypt and sign an inner message as WeCom would POST it."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        nonce = str(secrets.randbelow(10**10))
        encrypt = self.crypto.encrypt(inner_xml.encode("utf-8"))
        body = (
            f"<xml><ToUserName>{_cdata(self.corp_id)}</ToUserName>"
            f"<Encrypt>{_cdata(encrypt)}</Encrypt>"
            f"<AgentID>{_cdata(str(self.agent_id))}</AgentID></xml>"
        ).encode()
        query = {
            "msg_signature": self.crypto.signature(ts, nonce, encrypt),
            "timestamp": ts,
            "nonce": nonce,
        }
        msg_id = None
        if "<MsgId>" in inner_xml:
            msg_id = inner_xml.split("<MsgId>", 1)[1].split("</MsgId>", 1)[0]
        return Callback(query=query, body=body, msg_id=msg_id, inner_xml=inner_xml)

    def message(
        self,
        user: str,
        msg_type: str,
        fields: dict[str, str],
        *,
        msg_id: str | None = None,
        create_time: int | None = None,
    ) -> Callback:
        msg_id = msg_id or self.next_msg_id()
        created = int(time.time()) if create_time is None else create_time
        extra = "".join(f"<{k}>{_cdata(v)}</{k}>" for k, v in fields.items())
        inner = (
            f"<xml><ToUserName>{_cdata(self.corp_id)}</ToUserName>"
            f"<FromUserName>{_cdata(user)}</FromUserName>"
            f"<CreateTime>{created}</CreateTime>"
            f"<MsgType>{_cdata(msg_type)}</MsgType>{extra}"
            f"<MsgId>{escape(msg_id)}</MsgId>"
            f"<AgentID>{self.agent_id}</AgentID></xml>"
        )
        return self.wrap(inner)

    def text(self, user: str, content: str, *, msg_id: str | None = None) -> Callback:
        return self.message(user, "text", {"Content": content}, msg_id=msg_id)

    def event(
        self,
        user: str,
        event: str,
        *,
        event_key: str | None = None,
        create_time: int | None = None,
    ) -> Callback:
        """An event callback; ``event_key`` as WeCom sends it with a menu click (the
        item's key), https://developer.work.weixin.qq.com/document/path/90240."""
        created = int(time.time()) if create_time is None else create_time
        key = "" if event_key is None else f"<EventKey>{_cdata(event_key)}</EventKey>"
        inner = (
            f"<xml><ToUserName>{_cdata(self.corp_id)}</ToUserName>"
            f"<FromUserName>{_cdata(user)}</FromUserName>"
            f"<CreateTime>{created}</CreateTime>"
            f"<MsgType>{_cdata('event')}</MsgType>"
            f"<Event>{_cdata(event)}</Event>{key}"
            f"<AgentID>{self.agent_id}</AgentID></xml>"
        )
        return self.wrap(inner)

    def verify_url(self, echo: str | None = None) -> dict[str, str]:
        """Query parameters of the GET WeCom sends when the callback URL is saved."""
        ts = str(int(time.time()))
        nonce = str(secrets.randbelow(10**10))
        echostr = self.crypto.encrypt((echo or str(secrets.randbits(60))).encode())
        return {
            "msg_signature": self.crypto.signature(ts, nonce, echostr),
            "timestamp": ts,
            "nonce": nonce,
            "echostr": echostr,
        }
