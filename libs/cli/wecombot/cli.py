"""``wecombot``: one command, a subcommand per service.

    wecombot gateway   WeCom callback endpoint (HTTP) → MessageReceived events
    wecombot llm       received messages → model → reply events (scale by replicas)
    wecombot sender    reply events → WeCom message/send
    wecombot token     the only owner of WeCom access_tokens (NATS request-reply)
    wecombot dev       the whole system in the foreground (embedded nats-server)

Settings come from the environment (see .env.example); nothing else reads it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

SERVICES = {
    "gateway": "WeCom callback endpoint: verify, decrypt, store as events",
    "llm": "answer received messages with the model",
    "sender": "deliver replies through WeCom message/send",
    "token": "own and refresh WeCom access_tokens",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wecombot",
        description="WeCom ↔ LLM bridge over NATS JetStream. Settings come from the environment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in SERVICES.items():
        sub.add_parser(name, help=help_, description=help_)
    sub.add_parser(
        "dev",
        help="run everything in the foreground (embedded nats-server when NATS_URL is unset)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    module = importlib.import_module(
        "wecombot.dev" if args.command == "dev" else f"wecombot_{args.command}.main"
    )
    code: int = module.main(os.environ)
    return code


if __name__ == "__main__":
    sys.exit(main())
