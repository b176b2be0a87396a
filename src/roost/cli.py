"""The controller's command line: the runtime's host commands plus fleet-wide ones.

Only what parsing needs is imported up front; the deploy machinery, rich and
aiohttp load inside the commands that use them, so ``roost pack`` starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from roost.deploy.ssh import HOST_KEY_POLICIES, SSH, SSHOptions
from roost.runtime.cli import add_lifetime_options, build_parser, parse_size, run
from roost.runtime.errors import RoostError
from roost.runtime.store import check_keep, check_release_name
from roost.tracker.command import add_tracker_command

if TYPE_CHECKING:
    from roost.deploy.inventory import Host
    from roost.deploy.report import Reporter


def add_inventory_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hosts",
        metavar="FILE",
        help="hosts file ([user@]host[:port] key=value per line), Ansible INI inventory,"
        " or - for stdin",
    )
    p.add_argument("-H", dest="host_list", metavar="A,B,C", help="comma-separated hosts")
    p.add_argument("--group", metavar="NAME", help="Ansible inventory group to deploy to")
    p.add_argument(
        "--ssh-config", metavar="FILE", help="ssh_config to use (default: ~/.ssh/config)"
    )
    p.add_argument(
        "--host-key-policy",
        choices=sorted(HOST_KEY_POLICIES),
        default="strict",
        help="how to treat unknown host keys (default strict)",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--command-timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument(
        "--concurrency", type=int, default=100, metavar="N", help="SSH connections at once"
    )


def add_controller_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("deploy", help="deploy a release to a fleet, peer-to-peer")
    p.add_argument("src", metavar="SRC", help="directory (or file) to deploy")
    p.add_argument(
        "--local", type=int, metavar="N", help="simulate a fleet of N hosts on this machine"
    )
    add_inventory_options(p)
    p.add_argument(
        "--dest",
        required=True,
        metavar="DEST",
        help="release store on every host (with --local: BASE for BASE/host-1 ...)",
    )
    p.add_argument("--tag", metavar="NAME", help="release directory name (default: short id)")
    p.add_argument("--keep", type=int, metavar="K", help="then keep only K releases per host")
    p.add_argument("--piece-size", type=parse_size, metavar="SIZE", help="force a piece size")
    add_lifetime_options(p, "hosts keep")
    p.add_argument(
        "--all-or-nothing",
        action="store_true",
        help="switch current only once every host holds the release, and nowhere otherwise",
    )
    p.add_argument("--no-activate", action="store_true", help="distribute only")
    p.add_argument(
        "--hook", metavar="CMD", help="run on each host (in DEST/current) after activation"
    )
    p.add_argument("--tracker", metavar="URL", help="use a running tracker instead of our own")
    p.add_argument(
        "--tracker-token-file", metavar="FILE", help="that tracker's admin token (to register)"
    )
    p.add_argument("--advertise", metavar="ADDR", help="address hosts reach this machine on")
    p.add_argument(
        "--seeder",
        metavar="HOST",
        help="one of the hosts: send it the release first, then let it seed the others"
        " (when this machine's own uplink is slow)",
    )
    p.add_argument("--json", action="store_true", help="newline-delimited JSON events")
    p.set_defaults(handler=cmd_deploy)

    rollback = commands.choices["rollback"]
    rollback.add_argument("--dest", dest="fleet_dest", metavar="DEST", help="with --hosts / -H")
    add_inventory_options(rollback)
    rollback.set_defaults(handler=cmd_rollback, host_handler=rollback.get_default("handler"))
    dest = next(a for a in rollback._actions if a.dest == "dest")
    dest.nargs = "?"

    p = commands.add_parser("cleanup", help="stop roost's stray processes on hosts (by pid)")
    add_inventory_options(p)
    p.set_defaults(handler=cmd_cleanup)


def _hosts(args: argparse.Namespace) -> list[Host]:
    from roost.deploy.inventory import load_inventory

    stdin_text = sys.stdin.read() if args.hosts == "-" else None
    return load_inventory(
        hosts_file=args.hosts, host_list=args.host_list, group=args.group, stdin_text=stdin_text
    )


def _ssh(args: argparse.Namespace) -> SSH:
    return SSH(
        SSHOptions(
            config_file=args.ssh_config,
            host_key_policy=args.host_key_policy,
            connect_timeout=args.connect_timeout,
            command_timeout=args.command_timeout,
        )
    )


def cmd_deploy(args: argparse.Namespace) -> int:
    if not os.path.exists(args.src):
        raise RoostError(f"{args.src} does not exist")
    if args.tag is not None:
        check_release_name(args.tag)
    if args.keep is not None:
        check_keep(args.keep)
    fleet_given = args.hosts is not None or args.host_list is not None
    if (args.local is None) == (not fleet_given):
        raise RoostError("say where to deploy: --local N, or --hosts FILE / -H a,b,c")
    reporter = make_reporter(args.json)
    started = time.monotonic()
    if args.local is not None:
        from roost.deploy.local import LocalDeploy, deploy_local

        if args.local < 1:
            raise RoostError("--local needs at least 1 host")
        if args.seeder is not None:
            raise RoostError("--seeder is for fleet deploys (--hosts / -H), not --local")
        plan = LocalDeploy(
            src=args.src,
            hosts=args.local,
            base=args.dest,
            tag=args.tag,
            piece_size=args.piece_size,
            linger=args.linger,
            keep=args.keep,
        )
        hosts = asyncio.run(deploy_local(plan, reporter))
    else:
        from roost.deploy.fleet import FleetPlan, deploy_fleet

        token = None
        if args.tracker_token_file:
            with open(args.tracker_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        fleet = FleetPlan(
            src=args.src,
            hosts=_hosts(args),
            dest=args.dest,
            tag=args.tag,
            keep=args.keep,
            activate=not args.no_activate,
            all_or_nothing=args.all_or_nothing,
            hook=args.hook,
            linger=args.linger,
            stall_timeout=args.stall_timeout,
            piece_size=args.piece_size,
            tracker_url=args.tracker,
            tracker_token=token,
            advertise=args.advertise,
            concurrency=args.concurrency,
            seeder=args.seeder,
        )
        hosts = asyncio.run(deploy_fleet(fleet, _ssh(args), reporter))
    reporter.finish(hosts, time.monotonic() - started)
    return 0 if all(h.ok for h in hosts) else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    fleet_given = args.hosts is not None or args.host_list is not None
    if not fleet_given:
        if args.dest is None:
            raise RoostError("rollback needs DEST (or --hosts FILE --dest DEST)")
        return args.host_handler(args)
    if args.fleet_dest is None:
        raise RoostError("rollback --hosts needs --dest DEST")
    from roost.deploy.fleet import run_on_hosts

    hosts = _hosts(args)
    results = asyncio.run(
        run_on_hosts(hosts, _ssh(args), ["rollback", args.fleet_dest], args.concurrency)
    )
    return _report_fleet_command("rollback", results)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from roost.deploy.fleet import cleanup_hosts

    results = asyncio.run(cleanup_hosts(_hosts(args), _ssh(args), args.concurrency))
    return _report_fleet_command("cleanup", results)


def _report_fleet_command(what: str, results: dict[str, tuple[int, str]]) -> int:
    from rich.console import Console

    from roost.deploy.report import HostState, render_results

    states = []
    for name, (code, message) in results.items():
        state = HostState(name, "")
        if code == 0:
            state.state, state.hook = "verified", message
        else:
            state.fail(message)
        states.append(state)
    render_results(Console(highlight=False), what, states)
    return 0 if all(code == 0 for code, _ in results.values()) else 1


def make_reporter(json_events: bool) -> Reporter:
    from rich.console import Console

    from roost.deploy.report import JsonReporter, PlainReporter, RichReporter

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
