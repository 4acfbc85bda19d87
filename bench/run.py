"""Orchestrate a benchmark run: fakes, scenarios, table, docs/benchmarks.md.

python -m bench                      # the full run, a few minutes on 2 cores
python -m bench --quick              # a smoke run (tiny sizes, ~30 s, writes nothing)
python -m bench --only gateway,fanout --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wecombot_common.runtime import event_loop_name

from . import report
from .procs import Fakes, Profiler, WeComApp
from .profile import summarize
from .scenarios import FULL, QUICK, SCENARIOS, Context, Sizes

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wecombot-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (before any load)
    _say(f"work directory {workdir}")
    app = WeComApp()
    fakes = Fakes(app, workdir)
    profiler = Profiler(Path(args.profile) if args.profile else None)
    if profiler.outdir is not None:
        profiler.outdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        workdir=workdir,
        app=app,
        fakes=fakes,
        sizes=_sized(QUICK if args.quick else FULL, args.set),
        loop=args.loop,
        profiler=profiler,
    )
    results: dict[str, Any] = {}
    failed = False
    try:
        await fakes.start()
        for name in args.only:
            started = time.monotonic()
            _say(f"{name} …")
            results[name] = await SCENARIOS[name](ctx)
            _say(f"{name} done in {time.monotonic() - started:.1f}s")
    except BaseException:
        failed = True
        raise
    finally:
        await fakes.stop()
        if not failed and not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif failed:
            _say(f"logs kept in {workdir}")
    results["memory"] = ctx.memory
    if profiler.outputs:
        results["profile"] = {p.stem: summarize(p) for p in profiler.outputs}
    return results


def _sized(sizes: Sizes, overrides: list[str]) -> Sizes:
    """``--set fan_concurrency=500``: one field of Sizes changed, typed as its default."""
    changes: dict[str, Any] = {}
    for item in overrides:
        name, _, value = item.partition("=")
        current = getattr(sizes, name.strip())
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            changes[name.strip()] = tuple(kind(v) for v in value.split(","))
        else:
            changes[name.strip()] = type(current)(value)
    return dataclasses.replace(sizes, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--only",
        type=lambda v: [s.strip() for s in v.split(",") if s.strip()],
        default=list(SCENARIOS),
        help=f"comma-separated scenarios (default: all of {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown file to write the table into (default: docs/benchmarks.md for a "
        "full run of every scenario; nothing for --quick)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument("--profile", default=None, help="py-spy the services into this folder")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=event_loop_name({}),
        help="event loop of the services and the bare baseline (default: what they use)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one size of bench.scenarios.Sizes, e.g. fan_concurrency=500",
    )
    parser.add_argument("--workdir", default=None, help="keep logs and stores here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    info = report.machine(args.loop)
    results = asyncio.run(run(args))
    rendered = report.render(results, info, args.quick)
    print(rendered)
    for name, summary in results.get("profile", {}).items():
        print(f"\nprofile {name} (top self time, % of samples):")
        for line in summary:
            print(f"  {line}")
    output = args.output
    if output is None and not args.quick and not args.set and args.only == list(SCENARIOS):
        output = ROOT / "docs" / "benchmarks.md"
    if output is not None:
        report.write_into(output, rendered)
        _say(f"table written into {output}")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, **results}, indent=2, default=str))
    return 0
