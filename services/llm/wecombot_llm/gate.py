"""Who may use the model, and how often: the allowlist and per-user flood control. Pure.

The conversation fold asks the gate about each received message that needs an outcome,
in stream order, when it applies it. The verdict depends only on the conversation's own
earlier events (their WeCom ``CreateTime``, never the wall clock), so every replica, a
restarted process and a rebuilt cache reach the same verdict for the same message::

    >>> gate = Gate(GatePolicy(rate_per_minute=2))
    >>> [gate.verdict("zhang.san", at=t, is_event=False).name for t in (0, 1, 2, 3, 61)]
    ['ADMIT', 'ADMIT', 'FLOOD_NOTICE', 'SILENT', 'ADMIT']
    >>> gate = Gate(GatePolicy())  # enter_agent, when a welcome is set
    >>> [gate.verdict("zhang.san", at=t, is_event=True).name for t in (0, 600, 86400)]
    ['ADMIT', 'SILENT', 'ADMIT']
    >>> gate = Gate(GatePolicy(allowed_users=frozenset({"boss"})))
    >>> [gate.verdict("intruder", at=t, is_event=False).name for t in (0, 5, 86400)]
    ['REFUSAL_NOTICE', 'SILENT', 'REFUSAL_NOTICE']

Rules
    - A user not on the allowlist (when there is one; UserIDs compare case-insensitively,
      as WeCom treats them) gets one polite refusal, then silence for
      ``refusal_every_s`` (a day), then one refusal again. Their events get nothing.
    - Of a user's messages, at most ``rate_per_minute`` are admitted within any
      ``window_s`` (60 s) of each other. The first message over the rate gets one
      polite notice; the rest within the window of that notice get no outcome at all
      (the notice already told them), neither model call nor send.
    - Events (the welcome on ``enter_agent``, the only one answered) are not counted
      against the rate; a user is welcomed once per ``welcome_every_s`` (a day) at most:
      WeCom sends ``enter_agent`` each time a member opens the app (path/90376), and
      every welcome was a message, against the member's limits too.
    - Windows are symmetric (``|a - b| < 60 s``) because CreateTimes need not arrive in
      order; a message up to ten minutes older than the newest one seen is judged
      exactly, an even later one against what is remembered.

Why count admitted messages rather than every message: a user who pauses for a minute
is served again at once, however much they sent while flooding. Notices and silence
are cheap (no model call; a notice is one send), so WeCom's per-member limit of 30
messages a minute (https://developer.work.weixin.qq.com/document/path/90454) holds with
room to spare for the parts of long answers at the default rate of 10.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Gate", "GatePolicy", "Verdict"]

_MEMORY_WINDOWS = 10


class Verdict(enum.Enum):
    ADMIT = "admit"  # answered as usual: the model, a command, a notice
    FLOOD_NOTICE = "flood_notice"  # over the rate: one polite notice, no model call
    REFUSAL_NOTICE = "refusal_notice"  # not on the allowlist: one polite refusal
    SILENT = "silent"  # already told: no outcome at all


@dataclass(frozen=True, slots=True)
class GatePolicy:
    """``rate_per_minute`` 0 = no flood control; ``allowed_users`` None = everyone
    (otherwise case-folded UserIDs)."""

    rate_per_minute: int = 0
    allowed_users: frozenset[str] | None = None
    window_s: int = 60
    refusal_every_s: int = 86_400
    welcome_every_s: int = 86_400

    def allows(self, user: str) -> bool:
        return self.allowed_users is None or user.casefold() in self.allowed_users


class Gate:
    """The gate's memory of one conversation: what it admitted and whom it told, when."""

    __slots__ = ("_admitted", "_flood_notice_at", "_policy", "_refused_at", "_welcomed_at")

    def __init__(self, policy: GatePolicy) -> None:
        self._policy = policy
        # CreateTimes of the messages admitted within _MEMORY_WINDOWS of the newest: so
        # a message up to that late (a WeCom retry after an outage) is judged exactly.
        self._admitted: list[int] = []
        self._flood_notice_at: int | None = None
        self._refused_at: int | None = None
        self._welcomed_at: int | None = None

    def verdict(self, user: str, *, at: int, is_event: bool) -> Verdict:
        """The verdict for the next message (CreateTime ``at``), and remember it."""
        policy = self._policy
        if not policy.allows(user):
            if is_event or _within(self._refused_at, at, policy.refusal_every_s):
                return Verdict.SILENT
            self._refused_at = at
            return Verdict.REFUSAL_NOTICE
        if is_event:
            if _within(self._welcomed_at, at, policy.welcome_every_s):
                return Verdict.SILENT
            self._welcomed_at = at
            return Verdict.ADMIT
        if policy.rate_per_minute <= 0:
            return Verdict.ADMIT
        recent = sum(1 for t in self._admitted if abs(at - t) < policy.window_s)
        if recent < policy.rate_per_minute:
            self._admit(at)
            return Verdict.ADMIT
        if _within(self._flood_notice_at, at, policy.window_s):
            return Verdict.SILENT
        self._flood_notice_at = at
        return Verdict.FLOOD_NOTICE

    @property
    def remembered(self) -> int:
        """How many admitted CreateTimes this gate keeps (its memory, a few windows')."""
        return len(self._admitted)

    def _admit(self, at: int) -> None:
        self._admitted.append(at)
        # Forget what lies far from this message either way: a CreateTime far in the
        # future (a skewed clock at WeCom) kept as the newest used to stop any pruning.
        # A message _MEMORY_WINDOWS older than the newest is judged against the window
        # before it too: keep one window more.
        span = (_MEMORY_WINDOWS + 1) * self._policy.window_s
        if abs(self._admitted[0] - at) > span or abs(max(self._admitted) - at) > span:
            self._admitted = [t for t in self._admitted if abs(t - at) <= span]


def _within(told_at: int | None, at: int, span_s: int) -> bool:
    return told_at is not None and abs(at - told_at) < span_s
