"""Tests for wecombot_common.crypto against the official WeCom vectors, plus properties."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from Crypto.Cipher import AES
from defusedxml import ElementTree
from hypothesis import given
from hypothesis import strategies as st

from wecombot_common.crypto import (
    AESKeyError,
    Base64DecodeError,
    CryptoError,
    DecryptError,
    EncryptError,
    ParseError,
    PlaintextBufferError,
    ReceiveIdError,
    SignatureError,
    WeComCrypto,
    generate_encoding_aes_key,
    generate_token,
)
from wecombot_common.errors import WecombotError

_VECTORS = json.loads(
    (Path(__file__).parent.parent / "data" / "wecom_vectors.json").read_text(encoding="utf-8")
)
_SETS: list[dict[str, Any]] = [_VECTORS, *_VECTORS["additional_sets"]]
CASES = [(s, c) for s in _SETS for c in s["cases"]]
IDS = [f"{s['name']}-{c['kind']}" for s, c in CASES]

SET_A = _VECTORS
CASE_A = SET_A["cases"][1]  # post_xml
TOKEN, KEY, CORP = SET_A["token"], SET_A["encoding_aes_key"], SET_A["corp_id"]


def _crypto(vset: dict[str, Any], case: dict[str, Any]) -> WeComCrypto:
    return WeComCrypto(vset["token"], vset["encoding_aes_key"], case["expected_receive_id"])


def _aes(key43: str) -> Any:
    key = base64.b64decode(key43 + "=")
    return AES.new(key, AES.MODE_CBC, key[:16])


def _craft(raw: bytes, key43: str = KEY) -> str:
    """Encrypt ``raw`` (already block-aligned, no padding added) with the real key."""
    return base64.b64encode(_aes(key43).encrypt(raw)).decode()


def _plain(message: bytes, receive_id: bytes = CORP.encode(), length: int | None = None) -> bytes:
    n = len(message) if length is None else length
    return b"R" * 16 + n.to_bytes(4, "big") + message + receive_id


def _pad32(data: bytes) -> bytes:
    pad = 32 - len(data) % 32
    return data + bytes([pad]) * pad


def _raises(exc: type[CryptoError], code: int, fn: Any, *args: Any) -> None:
    with pytest.raises(exc) as info:
        fn(*args)
    assert info.value.code == code
    assert str(info.value).startswith(f"{code} ")


# --- official vectors -------------------------------------------------------------------


@pytest.mark.parametrize(("vset", "case"), CASES, ids=IDS)
def test_vector_signature(vset: dict[str, Any], case: dict[str, Any]) -> None:
    c = _crypto(vset, case)
    assert c.signature(case["timestamp"], case["nonce"], case["encrypt"]) == case["signature"]
    c.verify_signature(case["signature"], case["timestamp"], case["nonce"], case["encrypt"])


@pytest.mark.parametrize(("vset", "case"), CASES, ids=IDS)
def test_vector_decrypt(vset: dict[str, Any], case: dict[str, Any]) -> None:
    c = _crypto(vset, case)
    expected = case["expected_plaintext"].encode("utf-8")
    args = (case["signature"], case["timestamp"], case["nonce"], case["encrypt"])
    fn = c.verify_url if case["kind"] == "verify_url" else c.decrypt_callback
    assert fn(*args) == expected
    assert c.decrypt(case["encrypt"]) == expected


@pytest.mark.parametrize(("vset", "case"), CASES, ids=IDS)
def test_vector_encrypt_byte_for_byte(vset: dict[str, Any], case: dict[str, Any]) -> None:
    c = _crypto(vset, case)
    prefix = case["random_prefix_ascii"].encode("ascii")
    assert c.encrypt(case["expected_plaintext"].encode(), random_prefix=prefix) == case["encrypt"]


@pytest.mark.parametrize(("vset", "case"), CASES, ids=IDS)
def test_vector_pkcs7_pad_len(vset: dict[str, Any], case: dict[str, Any]) -> None:
    padded = _aes(vset["encoding_aes_key"]).decrypt(base64.b64decode(case["encrypt"]))
    pad = case["pkcs7_pad_len"]
    assert padded[-pad:] == bytes([pad]) * pad
    assert padded[-pad - 1] != pad  # exactly this much padding
    unpadded = 20 + len(case["expected_plaintext"].encode()) + len(case["expected_receive_id"])
    assert 32 - unpadded % 32 == pad
    assert padded[:16] == case["random_prefix_ascii"].encode()


POST_CASES = [(s, c) for s, c in CASES if c["kind"] != "verify_url"]


@pytest.mark.parametrize(
    ("vset", "case"), POST_CASES, ids=[f"{s['name']}-{c['kind']}" for s, c in POST_CASES]
)
def test_vector_request_body_carries_encrypt(vset: dict[str, Any], case: dict[str, Any]) -> None:
    body = case["request_body_example"]
    if case["kind"] == "post_json":  # the body is valid JSON; only its plaintext is not
        assert json.loads(body)["encrypt"] == case["encrypt"]
        assert case["expected_receive_id"] == vset["corp_id"]
    else:
        assert ElementTree.fromstring(body).findtext("Encrypt") == case["encrypt"]


def test_vector_wrong_receive_id() -> None:
    c = WeComCrypto(TOKEN, KEY, CORP + "x")
    _raises(ReceiveIdError, -40005, c.decrypt, CASE_A["encrypt"])
    _raises(ReceiveIdError, -40005, WeComCrypto(TOKEN, KEY, "").decrypt, CASE_A["encrypt"])
    other = _SETS[1]["cases"][0]  # set B ciphertext under set A's key: garbage
    with pytest.raises(CryptoError):
        WeComCrypto(TOKEN, KEY, CORP).decrypt(other["encrypt"])


def test_wrong_aes_key_is_an_illegal_buffer() -> None:
    """What docs/deploy.md tells operators: a Token that matches with another
    EncodingAESKey shows as -40008 (the padding or length of garbage), not -40007."""
    for i in range(64):
        ours, theirs = (
            base64.b64encode(hashlib.sha256(f"{side}{i}".encode()).digest()).decode()[:43]
            for side in ("ours", "theirs")
        )
        sent = WeComCrypto(TOKEN, theirs, CORP).encrypt(
            f"<xml><Content>{i}</Content></xml>".encode(), random_prefix=bytes(16)
        )
        _raises(PlaintextBufferError, -40008, WeComCrypto(TOKEN, ours, CORP).decrypt, sent)


# --- round trips ------------------------------------------------------------------------

USER_IDS = st.one_of(
    st.just(""),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-@.]{0,63}", fullmatch=True),
    st.text(max_size=40),
)
MESSAGES = st.one_of(st.just(b""), st.binary(min_size=33, max_size=600), st.binary(max_size=64))


@given(
    message=MESSAGES, receive_id=USER_IDS, prefix=st.none() | st.binary(min_size=16, max_size=16)
)
def test_roundtrip_encrypt_decrypt(message: bytes, receive_id: str, prefix: bytes | None) -> None:
    c = WeComCrypto(TOKEN, KEY, receive_id)
    enc = c.encrypt(message, random_prefix=prefix)
    assert len(base64.b64decode(enc)) % 32 == 0
    assert c.decrypt(enc) == message
    sig = c.signature("1409659813", "1372623149", enc)
    assert c.decrypt_callback(sig, "1409659813", "1372623149", enc) == message


@given(
    message=MESSAGES,
    receive_id=USER_IDS,
    timestamp=st.from_regex(r"[0-9]{1,12}", fullmatch=True),
    nonce=st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True),
)
def test_roundtrip_encrypt_reply(
    message: bytes, receive_id: str, timestamp: str, nonce: str
) -> None:
    c = WeComCrypto(TOKEN, KEY, receive_id)
    xml = c.encrypt_reply(message, timestamp=timestamp, nonce=nonce)
    root = ElementTree.fromstring(xml)
    assert [e.tag for e in root] == ["Encrypt", "MsgSignature", "TimeStamp", "Nonce"]
    enc, sig = root.findtext("Encrypt") or "", root.findtext("MsgSignature") or ""
    assert root.findtext("TimeStamp") == timestamp
    assert root.findtext("Nonce") == nonce
    assert c.decrypt_callback(sig, timestamp, nonce, enc) == message


def test_encrypt_reply_exact_format() -> None:
    c = WeComCrypto(TOKEN, KEY, CORP)
    prefix = CASE_A["random_prefix_ascii"].encode()
    message = CASE_A["expected_plaintext"].encode()
    xml = c.encrypt_reply(message, timestamp="1409659813", nonce="1372623149", random_prefix=prefix)
    assert xml == (
        f"<xml><Encrypt><![CDATA[{CASE_A['encrypt']}]]></Encrypt>"
        f"<MsgSignature><![CDATA[{CASE_A['signature']}]]></MsgSignature>"
        "<TimeStamp>1409659813</TimeStamp><Nonce><![CDATA[1372623149]]></Nonce></xml>"
    )


def test_encrypt_random_prefix_default_is_random() -> None:
    c = WeComCrypto(TOKEN, KEY, CORP)
    assert c.encrypt(b"same") != c.encrypt(b"same")


@pytest.mark.parametrize("prefix", [b"", b"x" * 15, b"x" * 17])
def test_encrypt_bad_prefix(prefix: bytes) -> None:
    c = WeComCrypto(TOKEN, KEY, CORP)
    _raises(EncryptError, -40006, lambda: c.encrypt(b"m", random_prefix=prefix))


def _reply(ts: str, nonce: str) -> None:
    WeComCrypto(TOKEN, KEY, CORP).encrypt_reply(b"m", timestamp=ts, nonce=nonce)


@pytest.mark.parametrize(
    ("ts", "nonce"),
    [("", "1"), ("1a", "1"), ("١٢", "1"), ("1", ""), ("1", "]]>"), ("1", "a b"), ("1", "ñ")],
)
def test_encrypt_reply_rejects_unsafe_fields(ts: str, nonce: str) -> None:
    _raises(EncryptError, -40006, _reply, ts, nonce)


# --- tampering --------------------------------------------------------------------------


def _callback(enc: str, sig: str = CASE_A["signature"]) -> bytes:
    c = WeComCrypto(TOKEN, KEY, CORP)
    return c.decrypt_callback(sig, CASE_A["timestamp"], CASE_A["nonce"], enc)


def test_flip_every_ciphertext_byte() -> None:
    raw = base64.b64decode(CASE_A["encrypt"])
    c = WeComCrypto(TOKEN, KEY, CORP)
    original = CASE_A["expected_plaintext"].encode()
    for i in range(len(raw)):
        enc = base64.b64encode(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]).decode()
        _raises(SignatureError, -40001, _callback, enc)
        # unsigned decrypt: CBC is malleable, but only typed errors may escape
        with contextlib.suppress(CryptoError):
            assert c.decrypt(enc) != original


@given(data=st.data())
def test_flip_random_bit_hypothesis(data: st.DataObject) -> None:
    raw = bytearray(base64.b64decode(CASE_A["encrypt"]))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    enc = base64.b64encode(bytes(raw)).decode()
    _raises(SignatureError, -40001, _callback, enc)
    with contextlib.suppress(CryptoError):
        WeComCrypto(TOKEN, KEY, CORP).decrypt(enc)


def test_flip_every_signature_char() -> None:
    sig = CASE_A["signature"]
    for i, ch in enumerate(sig):
        bad = sig[:i] + ("0" if ch != "0" else "1") + sig[i + 1 :]
        _raises(SignatureError, -40001, _callback, CASE_A["encrypt"], bad)
    for bad in ["", sig[:-1], sig + "0", sig.upper(), "é" * 40, "\ud800" * 40]:
        _raises(SignatureError, -40001, _callback, CASE_A["encrypt"], bad)


@given(sig=st.text(max_size=50), ts=st.text(max_size=20), nonce=st.text(max_size=20))
def test_arbitrary_signature_fields_only_signature_error(sig: str, ts: str, nonce: str) -> None:
    c = WeComCrypto(TOKEN, KEY, CORP)
    _raises(SignatureError, -40001, c.verify_signature, sig, ts, nonce, CASE_A["encrypt"])


def test_truncated_ciphertext() -> None:
    enc, raw = CASE_A["encrypt"], base64.b64decode(CASE_A["encrypt"])
    c = WeComCrypto(TOKEN, KEY, CORP)
    for n in range(len(enc)):
        _raises(SignatureError, -40001, _callback, enc[:n])
        with pytest.raises(CryptoError):
            c.decrypt(enc[:n])
    for n in (0, 1, 15, 17, 31, 33, len(raw) - 1):
        _raises(DecryptError, -40007, c.decrypt, base64.b64encode(raw[:n]).decode())
    for n in range(16, len(raw), 16):  # block-aligned truncation: caught after decryption
        with pytest.raises((PlaintextBufferError, ReceiveIdError)):
            c.decrypt(base64.b64encode(raw[:n]).decode())


@pytest.mark.parametrize(
    "bad", ["a", "abc", "ab=c", "!!!!", "ab cd===", "QUJD\n", "QUJDRA", "é" * 4, "\ud800AAA"]
)
def test_bad_base64(bad: str) -> None:
    _raises(Base64DecodeError, -40010, WeComCrypto(TOKEN, KEY, CORP).decrypt, bad)


@given(text=st.text(max_size=200))
def test_arbitrary_text_only_crypto_errors(text: str) -> None:
    with contextlib.suppress(CryptoError):
        WeComCrypto(TOKEN, KEY, CORP).decrypt(text)


@given(raw=st.binary(max_size=200))
def test_arbitrary_ciphertext_only_crypto_errors(raw: bytes) -> None:
    with pytest.raises(CryptoError):
        WeComCrypto(TOKEN, KEY, CORP).decrypt(base64.b64encode(raw).decode())


@pytest.mark.parametrize("last", [0, 33, 64, 255])
def test_bad_padding_value(last: int) -> None:
    raw = _plain(b"hello")
    raw += b"\x00" * (-(len(raw) + 1) % 32) + bytes([last])
    _raises(PlaintextBufferError, -40008, WeComCrypto(TOKEN, KEY, CORP).decrypt, _craft(raw))


def test_pad_value_33_rejected_even_if_bytes_agree() -> None:
    raw = _plain(b"123456789") + bytes([33]) * 33  # 80 bytes, otherwise well formed
    _raises(PlaintextBufferError, -40008, WeComCrypto(TOKEN, KEY, CORP).decrypt, _craft(raw))


def test_inconsistent_padding_bytes() -> None:
    padded = bytearray(_pad32(_plain(b"hello")))
    assert padded[-1] >= 2
    padded[-2] ^= 0xFF
    enc = _craft(bytes(padded))
    _raises(PlaintextBufferError, -40008, WeComCrypto(TOKEN, KEY, CORP).decrypt, enc)


def test_padding_16_byte_ciphertext_and_pad_32() -> None:
    c = WeComCrypto(TOKEN, KEY, CORP)
    # 16-byte ciphertext with pad 16: unpad leaves nothing -> short buffer
    _raises(PlaintextBufferError, -40008, c.decrypt, _craft(bytes([16]) * 16))
    # a full 32-byte pad block is valid
    message = b"x" * (-(20 + len(CORP)) % 32)
    assert c.decrypt(_craft(_plain(message) + bytes([32]) * 32)) == message


@pytest.mark.parametrize("length", [6, 100, 2**31, 2**32 - 1])
def test_length_prefix_beyond_buffer(length: int) -> None:
    enc = _craft(_pad32(_plain(b"hello", receive_id=b"", length=length)))
    _raises(PlaintextBufferError, -40008, WeComCrypto(TOKEN, KEY, "").decrypt, enc)


@pytest.mark.parametrize("size", [0, 1, 19])
def test_short_buffer(size: int) -> None:
    enc = _craft(_pad32(b"R" * size))
    _raises(PlaintextBufferError, -40008, WeComCrypto(TOKEN, KEY, "").decrypt, enc)


def test_crafted_receive_id_mismatch() -> None:
    c = WeComCrypto(TOKEN, KEY, CORP)
    for rid in [b"", CORP.encode()[:-1], CORP.encode() + b"\x00", CORP.upper().encode()]:
        _raises(ReceiveIdError, -40005, c.decrypt, _craft(_pad32(_plain(b"hi", receive_id=rid))))
    # a short length prefix moves message bytes into the receive_id
    _raises(ReceiveIdError, -40005, c.decrypt, _craft(_pad32(_plain(b"hi", length=1))))


@pytest.mark.parametrize(
    "key",
    [
        "",
        KEY[:42],
        KEY + "A",
        KEY + "=",
        KEY[:42] + "!",
        KEY[:42] + "é",
        "=" * 43,
        " " * 43,
        "A" * 39,
        KEY + "AAAA",
    ],
)
def test_bad_aes_key(key: str) -> None:
    _raises(AESKeyError, -40004, WeComCrypto, TOKEN, key, CORP)


# --- errors, repr, generators -----------------------------------------------------------


def test_error_classes() -> None:
    table = {
        SignatureError: (-40001, "signature mismatch"),
        ParseError: (-40002, "parse failed"),
        AESKeyError: (-40004, "invalid EncodingAESKey"),
        ReceiveIdError: (-40005, "receive_id mismatch"),
        EncryptError: (-40006, "encrypt failed"),
        DecryptError: (-40007, "decrypt failed"),
        PlaintextBufferError: (-40008, "illegal buffer"),
        Base64DecodeError: (-40010, "base64 decode failed"),
    }
    for cls, (code, reason) in table.items():
        err = cls()
        assert isinstance(err, CryptoError)
        assert isinstance(err, WecombotError)
        assert (err.code, err.reason) == (code, reason)
        assert str(err) == f"{code} {reason}"
        assert str(cls("why")) == f"{code} {reason}: why"
        assert str(pickle.loads(pickle.dumps(cls("why")))) == f"{code} {reason}: why"
    assert str(SignatureError()) == "-40001 signature mismatch"
    with pytest.raises(TypeError):
        CryptoError()


def test_repr_hides_secrets() -> None:
    token = generate_token()
    key = generate_encoding_aes_key()
    c = WeComCrypto(token, key, "corp42")
    for text in (repr(c), str(c)):
        assert "corp42" in text
        assert token not in text
        assert key not in text
        assert key[:8] not in text
        assert base64.b64decode(key + "=").hex()[:8] not in text
        assert repr(base64.b64decode(key + "="))[2:10] not in text
    assert not hasattr(c, "__dict__")


def test_generators() -> None:
    keys = {generate_encoding_aes_key() for _ in range(50)}
    tokens = {generate_token() for _ in range(50)}
    assert len(keys) == len(tokens) == 50
    for key in keys:
        assert len(key) == 43
        WeComCrypto("t", key, "")  # valid
    for token in tokens:
        assert len(token) == 32
        assert token.isascii()
        assert token.isalnum()
