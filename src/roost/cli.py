"""The controller's command line: the runtime's host commands plus fleet-wide ones."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence

from rich.console import Console

from roost.deploy.local import LocalDeploy, deploy_local
from roost.deploy.report import JsonReporter, PlainReporter, Reporter, RichReporter
from roost.runtime.cli import build_parser, parse_size, run
from roost.runtime.errors import RoostError
from roost.tracker.service import add_tracker_command


def add_controller_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("deploy", help="deploy a release to a fleet, peer-to-peer")
    p.add_argument("src", metavar="SRC", help="directory (or file) to deploy")
    p.add_argument(
        "--local",
        type=int,
        required=True,
        metavar="N",
        help="simulate a fleet of N hosts on this machine (loopback)",
    )
    p.add_argument(
        "--dest", required=True, metavar="BASE", help="hosts' destinations: BASE/host-1 ..."
    )
    p.add_argument("--tag", metavar="NAME", help="release directory name (default: short id)")
    p.add_argument("--keep", type=int, metavar="K", help="then keep only K releases per host")
    p.add_argument("--piece-size", type=parse_size, metavar="SIZE", help="force a piece size")
    p.add_argument(
        "--linger",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="hosts keep serving this long after completing, unless all are done (default 30)",
    )
    p.add_argument("--json", action="store_true", help="newline-delimited JSON events")
    p.set_defaults(handler=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.local < 1:
        raise RoostError("--local needs at least 1 host")
    if not os.path.exists(args.src):
        raise RoostError(f"{args.src} does not exist")
    plan = LocalDeploy(
        src=args.src,
        hosts=args.local,
        base=args.dest,
        tag=args.tag,
        piece_size=args.piece_size,
        linger=args.linger,
        keep=args.keep,
    )
    reporter = make_reporter(args.json)
    started = time.monotonic()
    hosts = asyncio.run(deploy_local(plan, reporter))
    reporter.finish(hosts, time.monotonic() - started)
    return 0 if all(h.ok for h in hosts) else 1


def make_reporter(json_events: bool) -> Reporter:
    if json_events:
        return JsonReporter()
    if sys.stdout.isatty():
        return RichReporter(Console())
    return PlainReporter()


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser("roost")
    add_controller_commands(commands)
    add_tracker_command(commands)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
