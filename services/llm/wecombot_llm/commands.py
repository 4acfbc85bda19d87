"""Chat commands a user can type instead of a question. Pure.

>>> parse_command(" /Reset ")
<Command.RESET: 'reset'>
>>> parse_command("#清除记忆")
<Command.RESET: 'reset'>
>>> parse_command("what is /reset?") is None
True
"""

from __future__ import annotations

import enum

__all__ = ["HELP_TEXT", "RESET_TEXT", "Command", "parse_command"]


class Command(enum.Enum):
    RESET = "reset"
    HELP = "help"


# What the user types (after trimming, lower-cased, full-width slash folded) → command.
_COMMANDS: dict[str, Command] = {
    "/reset": Command.RESET,
    "#清除记忆": Command.RESET,
    "/help": Command.HELP,
}

RESET_TEXT = "好的，之前的对话记忆已清除，我们重新开始吧。"
HELP_TEXT = (
    "直接发送文字即可提问，我会结合最近的对话回答。\n"
    "可用命令：\n"
    "/reset 或 #清除记忆 — 清除对话记忆，重新开始\n"
    "/help — 显示本帮助"
)


def parse_command(text: str) -> Command | None:
    """The command ``text`` is, or None for an ordinary message."""
    return _COMMANDS.get(text.strip().replace("／", "/").lower())
