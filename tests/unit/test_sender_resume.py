"""The pure parts of resuming a reply: which part the user saw last, and how far back
WeCom's duplicate check reaches; and which failed sends may have gone through."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from wecombot_common.bus import StoredEvent
from wecombot_common.events import PartDelivered, ReplyDelivered, ReplyGenerated
from wecombot_sender.domain import ConversationState, duplicate_check_interval, fold, record
from wecombot_sender.wecom import may_have_gone_out

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ENV = {"app": "ww1-1000002", "conversation": "u", "correlation_id": "m"}


def _part(reply_id: str, index: int) -> PartDelivered:
    return PartDelivered(**ENV, reply_id=reply_id, index=index, total=2, wecom_msgid="w")


def _last_part(state: ConversationState) -> tuple[str, int] | None:
    last = state.recent_parts[-1] if state.recent_parts else None
    return None if last is None else (last.reply_id, last.index)


def test_the_last_recorded_part_is_tracked_by_fold_and_record() -> None:
    a, b = ReplyGenerated(**ENV, text="a"), ReplyGenerated(**ENV, text="b")
    state = fold(ConversationState(), [StoredEvent(1, a), StoredEvent(2, _part(a.event_id, 0))])
    assert _last_part(state) == (a.event_id, 0)
    done = ReplyDelivered(**ENV, reply_id=a.event_id, parts=1, wecom_msgids=["w"])
    state = fold(state, [StoredEvent(3, done), StoredEvent(4, b)])
    assert _last_part(state) == (a.event_id, 0)  # a terminal event is not a message
    state = record(state, StoredEvent(5, _part(b.event_id, 1)))
    assert _last_part(state) == (b.event_id, 1)
    assert _last_part(ConversationState()) is None


@pytest.mark.parametrize(
    ("elapsed", "interval"),
    [(0.0, 1), (0.2, 2), (3.0, 4), (31.2, 33), (10 * 3600, 4 * 3600)],
)
def test_the_duplicate_check_reaches_just_before_the_last_send(
    elapsed: float, interval: int
) -> None:
    assert duplicate_check_interval(T0, T0 + timedelta(seconds=elapsed)) == interval


def test_a_clock_behind_still_asks_for_a_valid_interval() -> None:
    assert duplicate_check_interval(T0, T0 - timedelta(seconds=5)) == 1


@pytest.mark.parametrize(
    ("failure", "maybe_delivered"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ConnectTimeout("connect"), False),
        (httpx.PoolTimeout("pool"), False),
        (httpx.WriteTimeout("write"), True),
        (httpx.ReadTimeout("read"), True),
        (httpx.RemoteProtocolError("closed"), True),
        (httpx.ReadError("reset"), True),
    ],
)
def test_only_a_send_that_never_left_is_known_not_to_have_arrived(
    failure: httpx.TransportError, maybe_delivered: bool
) -> None:
    """The kinds a loopback server cannot make on demand (a connect timeout, a full pool)
    included; tests/integration/sender/test_wecom_wire.py has the real failures."""
    assert may_have_gone_out(failure) is maybe_delivered
