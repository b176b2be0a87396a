"""Command line of the runtime: the commands a host (or an operator) runs on one machine.

Standard library only, so the same commands work from the runtime zipapp on a
target host. The controller's CLI (``roost.cli``) adds fleet-wide commands on
top of these.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable

from roost import __version__
from roost.runtime.errors import RoostError
from roost.runtime.manifest import Manifest, load_manifest
from roost.runtime.pack import DEFAULT_EXCLUDES, pack
from roost.runtime.pidfile import recorded_process
from roost.runtime.store import Store, check_keep, check_release_name, install
from roost.runtime.tree import TreeSource, verify_tree

if TYPE_CHECKING:  # the swarm's modules load only for the commands that use them
    from roost.runtime.peer import EngineConfig

Handler = Callable[[argparse.Namespace], int]


def build_parser(prog: str = "roost") -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog=prog, description="Peer-to-peer deploys for server fleets: verified, atomic."
    )
    parser.add_argument("--version", action="version", version=f"roost {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_host_commands(commands)
    return parser, commands


def add_host_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("pack", help="describe a directory or file as a release manifest")
    p.add_argument("src", metavar="SRC", help="directory (or single file) to pack")
    p.add_argument("-o", "--output", metavar="FILE", help="manifest file to write")
    p.add_argument("--piece-size", type=parse_size, metavar="SIZE", help="force a piece size")
    p.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="skip matching paths"
    )
    p.add_argument(
        "--no-default-excludes",
        action="store_true",
        help=f"also pack {', '.join(DEFAULT_EXCLUDES)} (excluded by default)",
    )
    p.add_argument("--allow-external-symlinks", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=cmd_pack)

    p = commands.add_parser("inspect", help="summarize a manifest")
    p.add_argument("manifest", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_inspect)

    p = commands.add_parser("verify", help="check a tree against a manifest, byte for byte")
    p.add_argument("path", metavar="PATH")
    p.add_argument("manifest", metavar="MANIFEST")
    p.set_defaults(handler=cmd_verify)

    p = commands.add_parser("install", help="install a release from a local tree into DEST")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--from", dest="source", required=True, metavar="SRC_DIR")
    add_store_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=cmd_install)

    p = commands.add_parser("activate", help="switch DEST/current to a release atomically")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--keep", type=int, metavar="K", help="then keep only K releases")
    p.set_defaults(handler=cmd_activate)

    p = commands.add_parser("rollback", help="go back to the previously active release")
    p.add_argument("dest", metavar="DEST")
    p.set_defaults(handler=cmd_rollback)

    p = commands.add_parser("releases", help="list the releases in DEST")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_releases)

    p = commands.add_parser("fetch", help="download a release from its swarm into DEST")
    p.add_argument("manifest", metavar="MANIFEST", nargs="?")
    add_store_options(p)
    add_swarm_options(p)
    p.add_argument("--events", action="store_true", help="JSON progress events on stdout")
    p.add_argument(
        "--bootstrap-stdin",
        action="store_true",
        help="read the swarm secret and the manifest from stdin (as roost deploy sends them)"
        " and stop when stdin closes",
    )
    p.add_argument(
        "--serve-as-seeder",
        action="store_true",
        help="once complete, serve the others as an origin until stopped (roost deploy --seeder)",
    )
    p.set_defaults(handler=cmd_fetch)

    p = commands.add_parser("seed", help="serve a release to its swarm from its source tree")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("src", metavar="SRC_DIR")
    add_swarm_options(p)
    p.set_defaults(handler=cmd_seed)

    p = commands.add_parser("prune", help="delete old releases (never current or previous)")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--keep", type=int, required=True, metavar="K")
    p.set_defaults(handler=cmd_prune)


def add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", required=True, metavar="DEST", help="release store directory")
    p.add_argument("--tag", metavar="NAME", help="release directory name (default: short id)")
    p.add_argument("--activate", action="store_true", help="switch current to it when done")
    p.add_argument("--keep", type=int, metavar="K", help="then keep only the K newest releases")
    p.add_argument(
        "--force",
        action="store_true",
        help="DEST exists but is not a roost store: delete its contents and make it one",
    )


def add_swarm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracker", metavar="URL", help="tracker to announce to")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        type=parse_address,
        metavar="HOST:PORT",
        help="a peer to contact directly (repeatable; works without a tracker)",
    )
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help="file holding the swarm secret as hex (or set ROOST_SECRET_FILE / ROOST_SECRET)",
    )
    p.add_argument(
        "--listen",
        type=parse_address,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="address to accept peers on (default 127.0.0.1, any free port)",
    )
    p.add_argument("--advertise", metavar="HOST", help="address other peers should dial")
    p.add_argument("--rack", metavar="LABEL", help="this host's rack, for neighbour choice")
    add_lifetime_options(p)
    p.add_argument("--upload-rate", type=parse_size, metavar="BYTES/S", help="upload limit")
    p.add_argument("--download-rate", type=parse_size, metavar="BYTES/S", help="download limit")
    p.add_argument(
        "--congestion",
        default=DEFAULT_CONGESTION,
        metavar="NAME",
        help=f"TCP congestion control for peer connections (default {DEFAULT_CONGESTION};"
        " 'system': the host's default)",
    )


def add_lifetime_options(p: argparse.ArgumentParser, who: str = "keep") -> None:
    """How long a peer serves after completing, and when a download gives up."""
    p.add_argument(
        "--linger",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help=f"{who} serving this long after completing, unless the swarm is done (default 30)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up when no piece arrived for this long (default 300)",
    )


def engine_config(args: argparse.Namespace, secret: bytes | None = None) -> EngineConfig:
    from roost.runtime.peer import EngineConfig
    from roost.runtime.swarm import read_secret

    if not args.tracker and not args.peer and not getattr(args, "src", None):
        raise RoostError("nowhere to fetch from: give --tracker URL or --peer HOST:PORT")
    host, port = args.listen
    if host in ("0.0.0.0", "::", "") and not args.advertise and args.tracker:
        raise RoostError(
            f"listening on every address ({host}): tell peers where to reach this host"
            " with --advertise ADDR"
        )
    return EngineConfig(
        secret=secret if secret is not None else read_secret(args.secret_file),
        listen_host=host,
        listen_port=port,
        advertise_host=args.advertise,
        tracker=args.tracker,
        rack=args.rack,
        linger=args.linger,
        stall_timeout=args.stall_timeout,
        upload_rate=args.upload_rate,
        download_rate=args.download_rate,
        congestion=None if args.congestion == "system" else args.congestion,
        peers=list(args.peer),
    )


# -- commands -----------------------------------------------------------------------------


def cmd_pack(args: argparse.Namespace) -> int:
    output = args.output or os.path.basename(os.path.abspath(args.src)) + ".manifest"
    with Progress("hashing", enabled=not args.quiet) as progress:
        manifest = pack(
            args.src,
            piece_size=args.piece_size,
            excludes=args.exclude,
            default_excludes=not args.no_default_excludes,
            allow_external_symlinks=args.allow_external_symlinks,
            progress=progress.update,
        )
    with open(output, "wb") as f:
        f.write(manifest.to_bytes())
    print(
        f"packed {len(manifest.files)} files, {format_size(manifest.total_size)}"
        f" in {manifest.piece_count} pieces of {format_size(manifest.piece_size)}"
    )
    print(f"release {manifest.id}")
    print(f"manifest written to {output}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    summary = manifest.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"release     {summary['id']}")
    print(f"files       {summary['files']}")
    print(f"symlinks    {summary['symlinks']}")
    print(f"empty dirs  {summary['empty_dirs']}")
    print(f"bytes       {summary['bytes']} ({format_size(summary['bytes'])})")
    print(f"pieces      {summary['pieces']} of {format_size(summary['piece_size'])}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    if not os.path.isdir(args.path):
        raise RoostError(f"{args.path} is not a directory")
    problems = verify_tree(args.path, manifest)
    for problem in problems[:50]:
        print(problem)
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more")
    if problems:
        print(f"{args.path} does NOT match release {manifest.short_id}", file=sys.stderr)
        return 1
    print(f"{args.path} matches release {manifest.id}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    if not os.path.isdir(args.source):
        raise RoostError(f"--from {args.source} is not a directory")
    if args.tag is not None:
        check_release_name(args.tag)
    if args.keep is not None:
        check_keep(args.keep)
    store = Store.open(args.dest, create=True, force=args.force)
    with Progress("installing", enabled=not args.quiet) as progress:
        result = install(
            store,
            manifest,
            TreeSource(args.source, manifest),
            name=args.tag,
            activate=args.activate,
            keep=args.keep,
            progress=progress.update,
        )
    verb = "installed" if result.downloaded else "already installed"
    print(f"{verb} release {manifest.short_id} as {store.releases_dir}/{result.release.name}")
    report_activation(store, result.release.name if result.activated else None, result.pruned)
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    if args.keep is not None:
        check_keep(args.keep)
    store = Store.open(args.dest)
    with store.locked():
        store.activate(args.name)
        pruned = store.prune(args.keep) if args.keep is not None else []
    report_activation(store, args.name, pruned)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    store = Store.open(args.dest)
    with store.locked():
        name = store.rollback()
    print(f"rolled back: current -> releases/{name}")
    return 0


def cmd_releases(args: argparse.Namespace) -> int:
    store = Store.open(args.dest)
    current, previous = store.current_name(), store.previous_name()
    rows = [
        {
            **release.to_json(),
            "current": release.name == current,
            "previous": release.name == previous,
        }
        for release in store.releases()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no releases in {store.dest}")
    for row in rows:
        mark = "*" if row["current"] else ("-" if row["previous"] else " ")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["installed_at"]))
        print(f"{mark} {row['name']:<24} {row['id'][:12]}  {when}  {format_size(row['bytes'])}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from roost.runtime.swarm import EventLog, fetch, read_bootstrap

    if args.bootstrap_stdin:
        secret, data = read_bootstrap(sys.stdin.buffer)
        manifest = Manifest.from_bytes(data)
        config = engine_config(args, secret)
    elif args.manifest is None:
        raise RoostError("fetch needs a MANIFEST (or --bootstrap-stdin)")
    else:
        manifest = load_manifest(args.manifest)
        config = engine_config(args)
    if args.tag is not None:
        check_release_name(args.tag)
    if args.keep is not None:
        check_keep(args.keep)
    store = Store.open(args.dest, create=True, force=args.force)
    with recorded_process():
        release, stats = fetch(
            manifest,
            store,
            config,
            name=args.tag,
            activate=args.activate,
            keep=args.keep,
            events=EventLog(args.events),
            stop_on_eof=sys.stdin.buffer if args.bootstrap_stdin else None,
            serve_as_seeder=args.serve_as_seeder,
        )
    if not args.events:
        print(
            f"fetched release {manifest.short_id} into {store.releases_dir}/{release.name}:"
            f" {format_size(stats.from_origin)} from the origin,"
            f" {format_size(stats.from_peers)} from peers, {format_size(stats.uploaded)} uploaded"
        )
        report_activation(store, release.name if args.activate else None, [])
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from roost.runtime.swarm import seed

    manifest = load_manifest(args.manifest)
    config = engine_config(args)
    print(f"seeding release {manifest.short_id} from {args.src}", file=sys.stderr)
    with recorded_process():
        seed(manifest, args.src, config)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    store = Store.open(args.dest)
    with store.locked():
        pruned = store.prune(args.keep)
    report_activation(store, None, pruned)
    return 0


def report_activation(store: Store, activated: str | None, pruned: list[str]) -> None:
    if activated:
        print(f"activated: {store.current_link} -> releases/{activated}")
    if pruned:
        print(f"pruned: {', '.join(pruned)}")


# -- helpers ------------------------------------------------------------------------------

# Peers' TCP congestion control. Each host sends several streams through one link
# kept busy from start to finish, and BBR (v1) loses more segments there than
# CUBIC: on the testbed CUBIC took T_last from 21-23 s to 15-16 s
# (docs/scheduling.md has the measurements and the runs that went wrong).
DEFAULT_CONGESTION = "cubic"
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4M', '256KiB', '1g' or a byte count, in powers of 1024."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1M or 262144)")
    return int(match[1]) * 1024 ** " kmgt".index(match[2].lower() or " ")


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), int(port)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A one-line progress display on stderr, only when it is a terminal."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()
        self._shown = 0.0

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._shown < 0.1 and done < total):
            return
        self._shown = now
        rate = done / max(now - self.started, 1e-6)
        share = done / total if total else 1.0
        sys.stderr.write(
            f"\r{self.label}: {share:6.1%}  {format_size(done)} / {format_size(total)}"
            f"  {format_size(rate)}/s "
        )
        sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\n")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; operator mistakes become one line on stderr, not a trace."""
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so staging areas and pid records are cleaned up.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return handler(args)
    except RoostError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{parser.prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser, _ = build_parser()
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
