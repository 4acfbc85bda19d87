"""The error tree shared by every wecombot package.

::

    WecombotError
    ├── ConfigError              a setting is missing or malformed (start-up stops)
    ├── CryptoError              WeCom callback crypto; .code (official -400xx), .reason
    │   ├── SignatureError       -40001
    │   ├── ParseError           -40002
    │   ├── AESKeyError          -40004
    │   ├── ReceiveIdError       -40005
    │   ├── EncryptError         -40006
    │   ├── DecryptError         -40007
    │   ├── PlaintextBufferError -40008
    │   └── Base64DecodeError    -40010
    ├── TransientError           retry later: the same input may succeed
    └── PermanentError           never valid: retrying cannot help

The crypto errors are defined in ``wecombot_common.crypto``; this module only documents
them.

"Retry later" and "never valid" are distinct on purpose: only an entrypoint turns them
into ack / nak / term or an HTTP status.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ConfigError",
    "PermanentError",
    "TransientError",
    "WecombotError",
]


class WecombotError(Exception):
    """Root of every error raised on purpose by wecombot."""


class ConfigError(WecombotError):
    """A setting is missing or malformed; the message names the variable.

    ``problems``: one line per bad setting when several were collected at once
    (``EnvReader.raise_if_invalid``), else empty.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)


class TransientError(WecombotError):
    """A failure that may go away: retry with backoff."""


class PermanentError(WecombotError):
    """A failure that retrying cannot fix."""
