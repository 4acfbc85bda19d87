"""The token service's errors (under the shared tree in ``wecombot_common.errors``)::

    TransientError
    └── StoreUnavailable   the KV bucket did not answer (NATS down, no quorum): the
                           caller gets kind "unavailable" and retries

WeCom's own refusals are not exceptions: they are :class:`~.domain.Failure` values,
recorded in the shared state so every replica answers them and backs off alike.
"""

from __future__ import annotations

from wecombot_common.errors import TransientError

__all__ = ["StoreUnavailable"]


class StoreUnavailable(TransientError):
    """The token bucket could not be read or written; retry later."""
