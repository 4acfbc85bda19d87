"""``wecombot``: one command, a subcommand per service.

    wecombot gateway   WeCom callback endpoint (HTTP) → MessageReceived events
    wecombot llm       received messages → model → reply events (scale by replicas)
    wecombot sender    reply events → WeCom message/send
    wecombot token     the only owner of WeCom access_tokens (NATS request-reply)
    wecombot setup     create or update the JetStream streams (run once per deploy; waits
                       for NATS until stopped)
    wecombot dev       the whole system in the foreground (embedded nats-server)
    wecombot dlq       the dead-lettered messages, with why (``show SEQ`` for one)
    wecombot doctor    check a real configuration; explain each problem and its fix

Settings come from the environment (see .env.example); ``setup``, ``dev``, ``doctor`` and
``dlq`` also read a ``.env`` in the working directory, for the values not set.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from wecombot_common.errors import ConfigError

__all__ = ["main"]

# command -> (module with ``main(environ) -> int``, one-line help). Add a row per command.
COMMANDS: dict[str, tuple[str, str]] = {
    "gateway": (
        "wecombot_gateway.main",
        "WeCom callback endpoint: verify, decrypt, store as events",
    ),
    "llm": ("wecombot_llm.main", "answer received messages with the model"),
    "sender": ("wecombot_sender.main", "deliver replies through WeCom message/send"),
    "token": ("wecombot_token.main", "own and refresh WeCom access_tokens"),
    "setup": (
        "wecombot.setup",
        "create or update the JetStream streams; waits for NATS until stopped (deploy: NATS "
        "user setup)",
    ),
    "dev": (
        "wecombot.dev",
        "run everything in the foreground (embedded nats-server when NATS_URL is unset)",
    ),
    "dlq": (
        "wecombot.dlq",
        "list dead-lettered messages with their reasons (wecombot dlq --help)",
    ),
    "doctor": (
        "wecombot.doctor",
        "check a real configuration and explain each problem with its fix (wecombot doctor --help)",
    ),
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line up to the command, and each command's (still option-less) parser.

    No command parser has -h/--help of its own here: a command that takes arguments
    (``ACCEPTS_ARGS = True``) parses them itself, --help included, so its real options
    show; the others get -h/--help in :func:`main` (which knows, once it imported them).
    """
    parser = argparse.ArgumentParser(
        prog="wecombot",
        description=(
            "WeCom ↔ LLM bridge over NATS JetStream. Settings come from the environment "
            "(setup, dev, doctor and dlq also read ./.env for the values not set)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        name: sub.add_parser(name, help=help_, description=help_, add_help=False)
        for name, (_, help_) in COMMANDS.items()
    }
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parser()
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        if getattr(module, "ACCEPTS_ARGS", False):
            # Its own parser: its options, --help and errors (exit code 2).
            code: int = module.main(os.environ, rest)
            return code
        if rest:
            command = commands[args.command]
            command.add_argument("-h", "--help", action="help", help="show this help and exit")
            command.parse_args(rest)  # prints the help (exit 0) or the error (exit 2)
        code = module.main(os.environ)
        return code
    except ConfigError as exc:
        # What a command could not take before its own reporting began (./.env that is
        # not UTF-8): said, exit 2 as for any setting, not a traceback.
        print(f"wecombot {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
