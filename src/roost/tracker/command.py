"""``roost tracker``: the command line of the tracker service.

Kept apart from ``service`` so that building the CLI does not import aiohttp;
the service is loaded when the command runs.
"""

from __future__ import annotations

import argparse

from roost.runtime.errors import RoostError
from roost.tracker import DEFAULT_HOST, DEFAULT_PORT
from roost.tracker.policy import DEFAULT_HANDOUT, HandoutConfig
from roost.tracker.relay import CHAIN_BELOW, DEFAULT_STRIPES, RelayConfig


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
    p.add_argument(
        "--stripes",
        default="auto",
        metavar="auto|off|K",
        help="relay plan: K stripes (1 = a pipelined chain), auto (1 below"
        f" {CHAIN_BELOW} peers, else {DEFAULT_STRIPES}), or off (a plain swarm)",
    )
    p.set_defaults(handler=cmd_tracker)


def relay_config(stripes: str) -> RelayConfig | None:
    """``--stripes``: auto, off, or a number of stripes."""
    if stripes == "off":
        return None
    if stripes == "auto":
        return RelayConfig()
    count = int(stripes) if stripes.isdigit() else 0
    if not 1 <= count <= 16:
        raise RoostError(f"--stripes: expected auto, off or 1..16, not {stripes!r}")
    return RelayConfig(stripes=count)


def cmd_tracker(args: argparse.Namespace) -> int:
    from roost.tracker.service import load_or_create_token

    relay = relay_config(args.stripes)  # checked before anything is written
    token_file = args.token_file or f"{args.db}.token"
    token, created = load_or_create_token(token_file)
    verb = "wrote a new" if created else "using the"
    print(f"{verb} admin token in {token_file}")
    try:
        handout = HandoutConfig.for_degree(args.degree)
    except ValueError as exc:
        raise RoostError(str(exc)) from None
    from roost.tracker.service import TrackerConfig, run_tracker

    config = TrackerConfig(handout, relay=relay)
    run_tracker(args.host, args.port, args.db, admin_token=token, config=config)
    return 0
