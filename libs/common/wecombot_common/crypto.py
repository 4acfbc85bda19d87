"""WeCom callback crypto (WXBizMsgCrypt), byte-compatible with Tencent's official samples.

Algorithm (https://developer.work.weixin.qq.com/document/path/90968 加解密方案说明, and
https://developer.work.weixin.qq.com/document/path/91144 for the official libraries):

- signature = sha1(''.join(sorted([token, timestamp, nonce, encrypt]))).hexdigest()
- key = base64decode(EncodingAESKey + "=") (32 bytes), iv = key[:16], AES-256-CBC
- PKCS#7 padding to a multiple of 32 bytes (pad values 1..32)
- plaintext = 16 random bytes + uint32 big-endian len(msg) + msg + receive_id

Error codes follow the official libraries; as in the official Java sample, a decrypted
buffer that cannot be split (bad padding, bad length) is -40008, not -40007.

>>> c = WeComCrypto("QDG6eK", generate_encoding_aes_key(), "wx5823bf96d3bd56c7")
>>> c.decrypt(c.encrypt(b"hello"))
b'hello'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import string
from typing import ClassVar

from Crypto.Cipher import AES

from wecombot_common.errors import WecombotError

__all__ = [
    "AESKeyError",
    "Base64DecodeError",
    "CryptoError",
    "DecryptError",
    "EncryptError",
    "ParseError",
    "PlaintextBufferError",
    "ReceiveIdError",
    "SignatureError",
    "WeComCrypto",
    "generate_encoding_aes_key",
    "generate_token",
]

_PAD_BLOCK = 32  # WeCom pads to 32 bytes, not to the AES block (16)
_PREFIX_LEN = 16
_HEADER_LEN = _PREFIX_LEN + 4


class CryptoError(WecombotError):
    """Base of the crypto errors; ``code`` is the official code, ``reason`` a short text.

    Abstract: raise a subclass. ``detail`` never contains secrets.

    >>> str(SignatureError())
    '-40001 signature mismatch'
    """

    code: ClassVar[int]
    reason: ClassVar[str]

    def __init__(self, detail: str = "") -> None:
        if type(self) is CryptoError:
            raise TypeError("CryptoError is abstract; raise a subclass")
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        base = f"{self.code} {self.reason}"
        return f"{base}: {self.detail}" if self.detail else base


class SignatureError(CryptoError):
    """-40001: msg_signature does not match."""

    code, reason = -40001, "signature mismatch"


class ParseError(CryptoError):
    """-40002: the callback envelope (XML/JSON) cannot be parsed (raised by callers)."""

    code, reason = -40002, "parse failed"


class AESKeyError(CryptoError):
    """-40004: the EncodingAESKey is not 43 base64 chars decoding to 32 bytes."""

    code, reason = -40004, "invalid EncodingAESKey"


class ReceiveIdError(CryptoError):
    """-40005: the receive_id in the plaintext is not ours."""

    code, reason = -40005, "receive_id mismatch"


class EncryptError(CryptoError):
    """-40006: encryption or reply generation failed (bad arguments)."""

    code, reason = -40006, "encrypt failed"


class DecryptError(CryptoError):
    """-40007: AES decryption failed (ciphertext length not a positive multiple of 16)."""

    code, reason = -40007, "decrypt failed"


class PlaintextBufferError(CryptoError):
    """-40008: the decrypted buffer is malformed (padding, length prefix, too short)."""

    code, reason = -40008, "illegal buffer"


class Base64DecodeError(CryptoError):
    """-40010: the ciphertext is not strict base64."""

    code, reason = -40010, "base64 decode failed"


def _b64decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:  # ValueError: non-ASCII str
        raise Base64DecodeError() from exc


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class WeComCrypto:
    """Sign, verify, encrypt and decrypt WeCom callbacks for one app.

    ``receive_id`` is the CorpID for a self-built app, ``""`` for the AI bot.

    >>> key = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
    >>> c = WeComCrypto("QDG6eK", key, "wx5823bf96d3bd56c7")
    >>> echostr = ("P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3"
    ...            "zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ==")
    >>> c.verify_url("5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3", "1409659589", "263014780", echostr)
    b'1616140317555161061'
    """

    __slots__ = ("_ecb", "_key", "_receive_id", "_token")

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        if len(encoding_aes_key) != 43:
            raise AESKeyError(f"expected 43 characters, got {len(encoding_aes_key)}")
        try:
            key = _b64decode(encoding_aes_key + "=")
        except Base64DecodeError as exc:
            raise AESKeyError("not base64") from exc
        if len(key) != 32:  # pragma: no cover - 43 valid chars always give 32 bytes
            raise AESKeyError(f"expected 32 bytes, got {len(key)}")
        self._token = token
        self._key = key
        self._receive_id = _utf8(receive_id)
        # Decryption runs CBC over this one ECB cipher: building a cipher (key schedule
        # included) cost more than decrypting a whole callback (docs/benchmarks.md).
        self._ecb = AES.new(key, AES.MODE_ECB)

    def __repr__(self) -> str:
        rid = self._receive_id.decode("utf-8", "surrogatepass")
        return f"WeComCrypto(receive_id={rid!r}, token=<hidden>, key=<hidden>)"

    def signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        """Return the hex SHA-1 msg_signature of the four sorted fields.

        >>> len(WeComCrypto("t", generate_encoding_aes_key(), "").signature("1", "2", "x"))
        40
        """
        parts = sorted([self._token, timestamp, nonce, encrypt])
        return hashlib.sha1(_utf8("".join(parts)), usedforsecurity=False).hexdigest()

    def verify_signature(
        self, msg_signature: str, timestamp: str, nonce: str, encrypt: str
    ) -> None:
        """Raise SignatureError unless ``msg_signature`` matches (constant-time compare)."""
        expected = self.signature(timestamp, nonce, encrypt).encode("ascii")
        if not hmac.compare_digest(expected, _utf8(msg_signature)):
            raise SignatureError()

    def decrypt(self, encrypt: str) -> bytes:
        """Decrypt base64 ``encrypt`` and return the message; the receive_id is checked.

        Does not check the signature: use decrypt_callback / verify_url for input from
        the network (CBC without a MAC is malleable).
        """
        ciphertext = _b64decode(encrypt)
        if not ciphertext or len(ciphertext) % AES.block_size:
            raise DecryptError(f"ciphertext length {len(ciphertext)} is not a multiple of 16")
        try:
            blocks: bytes = self._ecb.decrypt(ciphertext)
        except (ValueError, TypeError) as exc:  # pragma: no cover - length checked above
            raise DecryptError() from exc
        # CBC: plaintext block i = D(C_i) XOR C_(i-1), with C_(-1) = iv = key[:16].
        chained = self._key[:16] + ciphertext[: -AES.block_size]
        padded = (int.from_bytes(blocks, "big") ^ int.from_bytes(chained, "big")).to_bytes(
            len(blocks), "big"
        )
        pad = padded[-1]
        if not 1 <= pad <= _PAD_BLOCK or padded[-pad:] != bytes([pad]) * pad:
            raise PlaintextBufferError("bad PKCS#7 padding")
        plain = padded[:-pad]
        if len(plain) < _HEADER_LEN:
            raise PlaintextBufferError("buffer shorter than 20 bytes")
        length = int.from_bytes(plain[_PREFIX_LEN:_HEADER_LEN], "big")
        if _HEADER_LEN + length > len(plain):
            raise PlaintextBufferError("length prefix beyond the buffer")
        if not hmac.compare_digest(plain[_HEADER_LEN + length :], self._receive_id):
            raise ReceiveIdError()
        return plain[_HEADER_LEN : _HEADER_LEN + length]

    def decrypt_callback(
        self, msg_signature: str, timestamp: str, nonce: str, encrypt: str
    ) -> bytes:
        """Verify the signature of a POST callback's ``Encrypt`` field, then decrypt it."""
        self.verify_signature(msg_signature, timestamp, nonce, encrypt)
        return self.decrypt(encrypt)

    def verify_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> bytes:
        """Answer the GET URL check: ``echostr`` already URL-decoded; return the body bytes."""
        return self.decrypt_callback(msg_signature, timestamp, nonce, echostr)

    def encrypt(self, message: bytes, *, random_prefix: bytes | None = None) -> str:
        """Encrypt ``message`` to base64; ``random_prefix`` (16 bytes) is for tests only.

        >>> key = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
        >>> c = WeComCrypto("QDG6eK", key, "wx5823bf96d3bd56c7")
        >>> c.encrypt(b"1616140317555161061", random_prefix=b"c41b64491c2468d0")[:16]
        'P9nAzCzyDtyTWESH'
        """
        prefix = secrets.token_bytes(_PREFIX_LEN) if random_prefix is None else random_prefix
        if len(prefix) != _PREFIX_LEN:
            raise EncryptError(f"random_prefix must be 16 bytes, got {len(prefix)}")
        if len(message) >= 1 << 32:
            raise EncryptError("message longer than 2**32 - 1 bytes")
        plain = prefix + len(message).to_bytes(4, "big") + message + self._receive_id
        pad = _PAD_BLOCK - len(plain) % _PAD_BLOCK
        plain += bytes([pad]) * pad
        try:
            ciphertext = AES.new(self._key, AES.MODE_CBC, self._key[:16]).encrypt(plain)
        except (ValueError, TypeError) as exc:  # pragma: no cover - always block-aligned
            raise EncryptError() from exc
        return base64.b64encode(ciphertext).decode("ascii")

    def encrypt_reply(
        self, message: bytes, *, timestamp: str, nonce: str, random_prefix: bytes | None = None
    ) -> str:
        """Build the encrypted passive-reply XML (timestamp: digits, nonce: alphanumeric).

        >>> c = WeComCrypto("t", generate_encoding_aes_key(), "corp")
        >>> c.encrypt_reply(b"<xml/>", timestamp="1409659589", nonce="42").startswith("<xml>")
        True
        """
        if not (timestamp.isascii() and timestamp.isdigit()):
            raise EncryptError("timestamp must be ASCII digits")
        if not (nonce.isascii() and nonce.isalnum()):
            raise EncryptError("nonce must be ASCII letters or digits")
        encrypt = self.encrypt(message, random_prefix=random_prefix)
        sig = self.signature(timestamp, nonce, encrypt)
        return (
            f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt>"
            f"<MsgSignature><![CDATA[{sig}]]></MsgSignature>"
            f"<TimeStamp>{timestamp}</TimeStamp>"
            f"<Nonce><![CDATA[{nonce}]]></Nonce></xml>"
        )


def generate_encoding_aes_key() -> str:
    """Return a random valid EncodingAESKey (43 base64 characters, 32 bytes of entropy).

    >>> len(generate_encoding_aes_key())
    43
    """
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")[:43]


def generate_token() -> str:
    """Return a random callback Token of 32 ASCII letters and digits.

    >>> len(generate_token())
    32
    """
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))
