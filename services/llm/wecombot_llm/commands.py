"""Chat commands a user can type instead of a question. Pure.

>>> parse_command(" /Reset ")
<Command.RESET: 'reset'>
>>> parse_command("#清除记忆")
<Command.RESET: 'reset'>
>>> parse_command("what is /reset?") is None
True
>>> parse_command("＃清\u200b除记忆。")
<Command.RESET: 'reset'>
>>> menu_command(WeComEventPayload(event="click", event_key="/reset"))
<Command.RESET: 'reset'>
"""

from __future__ import annotations

import enum
import unicodedata

from wecombot_common.events import Payload, WeComEventPayload
from wecombot_common.text import without_invisible

__all__ = ["HELP_TEXT", "RESET_TEXT", "Command", "menu_command", "parse_command"]


class Command(enum.Enum):
    RESET = "reset"
    HELP = "help"


# What the user types (NFKC-folded: full-width ／＃ and letters as ASCII; without
# whitespace, invisible characters and a final full stop; lower-cased) → command.
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
    """The command ``text`` is, or None for an ordinary message. A Chinese keyboard types
    ``＃`` and ``／`` full-width and may end a line with ``。``: those count too."""
    if len(text) > 64:  # a command is a few characters; a question is not folded
        return None
    folded = without_invisible(unicodedata.normalize("NFKC", text))
    return _COMMANDS.get("".join(folded.split()).rstrip("。.").lower())


def menu_command(payload: Payload) -> Command | None:
    """The command a custom-menu item runs, or None: an item of type ``click`` whose key
    is a command (``/reset``, ``/help``, ``#清除记忆``) runs it as if typed. WeCom sends
    ``Event=click`` with ``EventKey`` = the item's key ("点击菜单拉取消息的事件推送",
    https://developer.work.weixin.qq.com/document/path/90240); any other key, and every
    other menu event, is not answered."""
    if isinstance(payload, WeComEventPayload) and payload.event == "click" and payload.event_key:
        return parse_command(payload.event_key)
    return None
