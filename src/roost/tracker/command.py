"""``roost tracker``: the command line of the tracker service.

Kept apart from ``service`` so that building the CLI does not import aiohttp;
the service is loaded when the command runs.
"""

from __future__ import annotations

import argparse

from roost.runtime.errors import RoostError
from roost.tracker import DEFAULT_HOST, DEFAULT_PORT
from roost.tracker.policy import DEFAULT_HANDOUT, HandoutConfig


def add_tracker_command(commands: argparse._SubParsersAction) -> None:
    """``roost tracker``: run the tracker service in the foreground."""
    p = commands.add_parser("tracker", help="run the tracker service (swarm membership)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--db", default="roost-tracker.db", metavar="FILE", help="SQLite state file")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="admin token file, created (0600) if missing (default: DB file + .token)",
    )
    p.add_argument(
        "--degree",
        type=int,
        default=DEFAULT_HANDOUT.degree,
        help=f"neighbours per peer (default {DEFAULT_HANDOUT.degree})",
    )
    p.set_defaults(handler=cmd_tracker)


def cmd_tracker(args: argparse.Namespace) -> int:
    from roost.tracker.service import load_or_create_token

    token_file = args.token_file or f"{args.db}.token"
    token, created = load_or_create_token(token_file)
    verb = "wrote a new" if created else "using the"
    print(f"{verb} admin token in {token_file}")
    try:
        handout = HandoutConfig.for_degree(args.degree)
    except ValueError as exc:
        raise RoostError(str(exc)) from None
    from roost.tracker.service import TrackerConfig, run_tracker

    run_tracker(args.host, args.port, args.db, admin_token=token, config=TrackerConfig(handout))
    return 0
