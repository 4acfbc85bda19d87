"""Summaries of py-spy's raw (collapsed) stacks: where a service's CPU time goes.

``python -m bench.profile FILE…`` prints, per file, the functions with the most self time
and the most inclusive time (idle samples, a thread waiting in epoll, are left out).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

__all__ = ["load", "summarize"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")
# Leaf frames that mean "waiting for I/O": the selector, or uvloop's C loop (whose last
# Python frame is the one that started it).
_IDLE = (".select (selectors.py", "run_until_complete (", "run (uvloop", "Runner.run (")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/libs/common/", "/services/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append(([_short(f) for f in stack.split(";")], int(count)))
    return stacks


# What a sample was busy with: the first category (in this order) any of whose markers
# appears in its stack. Specific work first, the generic layers under it last. The llm's
# model client is httpx over aiohttp (httpx_aiohttp): aiohttp's client modules read the
# answer in protocol callbacks, stacks without OpenAIChatModel, so they are named here
# (the services' only aiohttp client); what is left of aiohttp is the server's.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("crypto: signature + AES-CBC", ("WeComCrypto.",)),
    ("XML parsing + the event", ("parse_envelope", "parse_message")),
    ("JetStream append + PubAck", ("append_event", "PipelinedAppender.", "_dead_letter")),
    ("conversation reads (direct get)", ("read_conversation",)),
    (
        "model call (httpx + aiohttp client)",
        ("OpenAIChatModel.", "(httpx_aiohttp/", "(aiohttp/client", "(aiohttp/connector.py"),
    ),
    ("message/send (httpx)", ("HttpMessageApi.",)),
    ("token request-reply", ("TokenClient.",)),
    ("ack / nak / in_progress", ("ack_sync", "Msg.nak", "Msg.in_progress", "Msg.term")),
    ("pull fetch", ("PullSubscription.fetch", "_fetch_n")),
    ("logging", ("structlog/", "logging/__init__", "wecombot_common/logs.py")),
    ("HTTP server (aiohttp)", ("aiohttp/",)),
    ("NATS client I/O", ("nats/aio/", "nats/protocol/", "nats/js/")),
    ("event loop, tasks, other", ("",)),
)


def categories(path: Path) -> list[tuple[str, float]]:
    """Share of busy samples per :data:`CATEGORIES` entry, largest first."""
    counts: dict[str, int] = {}
    busy = 0
    for frames, n in load(path):
        if any(m in frames[-1] for m in _IDLE):
            continue
        busy += n
        joined = ";".join(frames)
        for name, markers in CATEGORIES:
            if any(m in joined for m in markers):
                counts[name] = counts.get(name, 0) + n
                break
    total = busy or 1
    return sorted(((k, 100 * v / total) for k, v in counts.items()), key=lambda kv: -kv[1])


def summarize(path: Path, *, top: int = 15) -> list[str]:
    stacks = load(path)
    busy = [(frames, n) for frames, n in stacks if not any(m in frames[-1] for m in _IDLE)]
    total = sum(n for _, n in stacks) or 1
    busy_total = sum(n for _, n in busy) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in busy:
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"busy {100 * busy_total / total:.0f}% of {total} samples; by component:"]
    lines += [f"{share:5.1f}%  {name}" for name, share in categories(path)]
    lines.append("self time:")
    lines += [f"{100 * n / busy_total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("inclusive:")
    lines += [f"{100 * n / busy_total:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"== {arg}")
        print("\n".join(summarize(Path(arg), top=25)))
