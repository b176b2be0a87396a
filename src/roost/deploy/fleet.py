"""``roost deploy SRC --hosts FILE --dest DEST``: an agentless, peer-to-peer fleet deploy.

Phases, each host independently and at most ``concurrency`` hosts at a time:

1. **Bootstrap.** A probe (``python3 -c``) reports the host's Python and
   whether it caches this exact runtime zipapp; only hosts that lack it are
   sent it, checked by hash on arrival.
2. **Distribute.** The controller runs a tracker and a seeder (or uses
   ``--tracker`` / ``--seeder HOST``). Each host runs ``roost-runtime fetch``
   over SSH; the manifest and the swarm secret travel on that command's stdin
   (SSH is the trust anchor; nothing secret touches the host's disk or argv),
   and progress comes back as JSON lines on its stdout.
3. **Activate.** By default each host switches ``current`` as soon as it holds
   the verified release; ``--all-or-nothing`` switches every host only once
   all hold it, and none otherwise; then the ``--hook`` runs.
4. **Clean up.** Closing a host's stdin ends its peer (it lingers to serve
   others only while the deploy runs); no temporary file is left on hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from roost.deploy import remote
from roost.deploy.bundle import runtime_bundle
from roost.deploy.inventory import Host
from roost.deploy.report import HostState, Reporter
from roost.deploy.ssh import SSH, python_command, quote_path
from roost.runtime import announce
from roost.runtime.errors import RoostError
from roost.runtime.manifest import Manifest
from roost.runtime.pack import pack
from roost.runtime.peer import Engine, EngineConfig, Pieces
from roost.tracker.service import running_tracker

HOOK_TAIL_LINES = 5


@dataclass
class FleetPlan:
    src: str
    hosts: list[Host]
    dest: str
    tag: str | None = None
    keep: int | None = None
    activate: bool = True
    all_or_nothing: bool = False
    hook: str | None = None
    linger: float = 30.0
    stall_timeout: float = 300.0
    piece_size: int | None = None
    tracker_url: str | None = None
    tracker_token: str | None = None
    advertise: str | None = None
    concurrency: int = 100


@dataclass
class _Probe:
    runtime: str
    has_runtime: bool
    host_address: str  # the host's address as the controller reached it
    controller_address: str  # the controller's address as the host sees it


@dataclass
class _Fleet:
    """What the phases share: one record per host, and the runtime's remote path."""

    plan: FleetPlan
    ssh: SSH
    reporter: Reporter
    states: dict[str, HostState] = field(default_factory=dict)
    probes: dict[str, _Probe] = field(default_factory=dict)
    fetches: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def fail(self, host: Host, error: str) -> None:
        state = self.states[host.name]
        state.fail(error)
        self.reporter.update(state)


async def deploy_fleet(plan: FleetPlan, ssh: SSH, reporter: Reporter) -> list[HostState]:
    loop = asyncio.get_running_loop()
    reporter.phase(f"packing {plan.src}")
    manifest = await loop.run_in_executor(None, lambda: pack(plan.src, piece_size=plan.piece_size))
    fleet = _Fleet(plan, ssh, reporter)
    fleet.states = {h.name: HostState(h.name, plan.dest) for h in plan.hosts}
    reporter.start(manifest, list(fleet.states.values()))
    limit = asyncio.Semaphore(plan.concurrency)
    try:
        reporter.phase("bootstrapping hosts")
        await asyncio.gather(*(_bootstrap(fleet, h, limit) for h in plan.hosts))
        live = [h for h in plan.hosts if h.name in fleet.probes]
        if live:
            await _distribute(fleet, manifest, live, limit)
        if plan.all_or_nothing and plan.activate:
            await _activate_all_or_nothing(fleet, manifest, limit)
        if plan.hook:
            activated = [h for h in plan.hosts if fleet.states[h.name].activated]
            await asyncio.gather(*(_run_hook(fleet, h, limit) for h in activated))
    finally:
        await _stop_fetches(fleet)
        await ssh.close(plan.hosts)
    for state in fleet.states.values():
        if state.state == "complete":
            state.state = "verified"  # each host checked every piece and the tree itself
    return list(fleet.states.values())


class HostFailure(Exception):
    """A host that cannot take part, with the reason to report."""


async def ensure_runtime(ssh: SSH, host: Host) -> _Probe:
    """Probe the host and send it the runtime zipapp unless it already caches this one."""
    bundle = runtime_bundle()
    result = await ssh.run(
        host,
        python_command(remote.PROBE, bundle.name, bundle.sha256),
        timeout=ssh.options.connect_timeout + 30,
    )
    if result.code != 0:
        raise HostFailure(f"unreachable: {result.error_line}")
    try:
        info = json.loads(result.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise HostFailure("the host's python3 did not answer the probe") from None
    if tuple(info["python"]) < remote.MIN_PYTHON:
        version = ".".join(map(str, info["python"]))
        raise HostFailure(f"python3 on the host is {version}; roost needs 3.9 or newer")
    if not info["has_runtime"]:
        sent = await ssh.run(
            host, python_command(remote.INSTALL, info["runtime"], bundle.sha256), stdin=bundle.data
        )
        if sent.code != 0:
            raise HostFailure(f"could not install the runtime: {sent.error_line}")
    client, _, server = _split_ssh_connection(info["ssh_connection"], host.address)
    return _Probe(info["runtime"], info["has_runtime"], server, client)


async def _bootstrap(fleet: _Fleet, host: Host, limit: asyncio.Semaphore) -> None:
    async with limit:
        try:
            fleet.probes[host.name] = await ensure_runtime(fleet.ssh, host)
        except HostFailure as exc:
            fleet.fail(host, str(exc))
            return
    fleet.states[host.name].state = "ready"
    fleet.reporter.update(fleet.states[host.name])


def _split_ssh_connection(value: str, fallback: str) -> tuple[str, str, str]:
    """SSH_CONNECTION is 'client_ip client_port server_ip server_port'."""
    parts = value.split()
    if len(parts) != 4:
        return "", "", fallback
    return parts[0], parts[1], parts[2]


async def _distribute(
    fleet: _Fleet, manifest: Manifest, live: list[Host], limit: asyncio.Semaphore
) -> None:
    plan = fleet.plan
    secret = os.urandom(32)
    advertise = plan.advertise or fleet.probes[live[0].name].controller_address
    if not advertise:
        raise RoostError("cannot tell which address hosts reach this machine on: use --advertise")
    async with _tracker(plan, advertise, manifest, secret, len(live)) as tracker_url:
        seeder = Engine(
            manifest,
            Pieces(plan.src, manifest, complete=True),
            EngineConfig(
                secret=secret,
                tracker=tracker_url,
                seeder=True,
                listen_host=advertise,
                advertise_host=advertise,
            ),
        )
        seeding = asyncio.get_running_loop().create_task(seeder.run())
        try:
            fleet.reporter.phase("distributing")
            await asyncio.gather(
                *(_fetch(fleet, h, manifest, secret, tracker_url, limit) for h in live)
            )
        finally:
            seeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await seeding
        fleet.reporter.origin_uploaded(seeder.stats.uploaded)


@contextlib.asynccontextmanager
async def _tracker(
    plan: FleetPlan, advertise: str, manifest: Manifest, secret: bytes, expected: int
) -> AsyncIterator[str]:
    key = announce.tracker_key(secret, manifest.id)
    loop = asyncio.get_running_loop()
    if plan.tracker_url:
        if not plan.tracker_token:
            raise RoostError("--tracker needs the tracker's admin token (--tracker-token-file)")
        await loop.run_in_executor(
            None,
            lambda: announce.register_swarm(
                plan.tracker_url, plan.tracker_token, manifest.id, key, expected_peers=expected
            ),
        )
        yield plan.tracker_url
        return
    async with running_tracker(":memory:", host=advertise, port=0) as tracker:
        await loop.run_in_executor(
            None,
            lambda: announce.register_swarm(
                tracker.url, tracker.admin_token, manifest.id, key, expected_peers=expected
            ),
        )
        yield tracker.url


async def _fetch(
    fleet: _Fleet,
    host: Host,
    manifest: Manifest,
    secret: bytes,
    tracker_url: str,
    limit: asyncio.Semaphore,
) -> None:
    plan = fleet.plan
    probe = fleet.probes[host.name]
    state = fleet.states[host.name]
    args = [
        "fetch", "--bootstrap-stdin", "--events",
        "--dest", plan.dest,
        "--tracker", tracker_url,
        "--listen", "0.0.0.0:0",
        "--advertise", probe.host_address,
        "--linger", str(plan.linger),
        "--stall-timeout", str(plan.stall_timeout),
    ]  # fmt: skip
    if plan.tag:
        args += ["--tag", plan.tag]
    if plan.keep is not None:
        args += ["--keep", str(plan.keep)]
    if host.rack:
        args += ["--rack", host.rack]
    if plan.activate and not plan.all_or_nothing:
        args.append("--activate")
    command = " ".join(["python3", quote_path(probe.runtime), *map(shlex.quote, args)])
    async with limit:
        process = await fleet.ssh.start(host, command)
        fleet.fetches[host.name] = process
        assert process.stdin and process.stdout and process.stderr
        header = {"secret": secret.hex(), "manifest_bytes": len(manifest.to_bytes())}
        process.stdin.write(json.dumps(header).encode() + b"\n" + manifest.to_bytes())
        stderr = asyncio.get_running_loop().create_task(process.stderr.read())
        state.state = "running"
        fleet.reporter.update(state)
        started = asyncio.get_running_loop().time()
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()
        async for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            state.apply(event, asyncio.get_running_loop().time() - started)
            if event.get("event") == "complete":
                state.activated = plan.activate and not plan.all_or_nothing
                fleet.reporter.update(state)
                return  # the peer keeps serving until the deploy ends (stdin closes)
            fleet.reporter.update(state)
        code = await process.wait()
        errors = (await stderr).decode("utf-8", "replace").strip().splitlines()
        if state.state != "failed":
            reason = errors[-1] if errors else f"exited with status {code}"
            if code == 255:
                reason = f"connection lost: {reason}"
            fleet.fail(host, reason)


async def _activate_all_or_nothing(
    fleet: _Fleet, manifest: Manifest, limit: asyncio.Semaphore
) -> None:
    states = fleet.states.values()
    if not all(s.state == "complete" for s in states):
        missing = [s.name for s in states if s.state != "complete"]
        fleet.reporter.phase(
            f"--all-or-nothing: not activating anywhere ({', '.join(missing)} not ready)"
        )
        return
    fleet.reporter.phase("activating every host")
    name = fleet.plan.tag or manifest.short_id

    async def activate(host: Host) -> None:
        probe = fleet.probes[host.name]
        command = " ".join(
            ["python3", quote_path(probe.runtime), "activate", shlex.quote(fleet.plan.dest), name]
        )
        async with limit:
            result = await fleet.ssh.run(host, command)
        if result.code != 0:
            fleet.fail(host, f"activation failed: {result.error_line}")
        else:
            fleet.states[host.name].activated = True
            fleet.reporter.update(fleet.states[host.name])

    await asyncio.gather(*(activate(h) for h in fleet.plan.hosts))


async def _run_hook(fleet: _Fleet, host: Host, limit: asyncio.Semaphore) -> None:
    assert fleet.plan.hook
    current = quote_path(os.path.join(fleet.plan.dest, "current"))
    command = f"cd {current} && sh -c {shlex.quote(fleet.plan.hook)} 2>&1"
    async with limit:
        result = await fleet.ssh.run(host, command)
    state = fleet.states[host.name]
    tail = result.stdout.decode("utf-8", "replace").strip().splitlines()[-HOOK_TAIL_LINES:]
    state.hook = f"exit {result.code}" + (f": {tail[-1]}" if tail else "")
    if result.code != 0:
        fleet.fail(host, f"hook failed (exit {result.code}): {' | '.join(tail)}")
    else:
        fleet.reporter.update(state)


async def _stop_fetches(fleet: _Fleet) -> None:
    """Close every peer's stdin: the signal to stop serving and exit."""
    for process in fleet.fetches.values():
        if process.stdin is not None:
            process.stdin.close()
    for name, process in fleet.fetches.items():
        try:
            await asyncio.wait_for(process.wait(), 30)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            fleet.states[name].error = fleet.states[name].error or "peer did not stop in time"


async def run_on_hosts(
    hosts: list[Host], ssh: SSH, args: list[str], concurrency: int = 100
) -> dict[str, tuple[int, str]]:
    """Run a runtime command (bootstrapping the runtime where needed) on every host."""
    limit = asyncio.Semaphore(concurrency)

    async def one(host: Host) -> tuple[int, str]:
        async with limit:
            try:
                probe = await ensure_runtime(ssh, host)
            except HostFailure as exc:
                return 255, str(exc)
            command = " ".join(["python3", quote_path(probe.runtime), *map(shlex.quote, args)])
            result = await ssh.run(host, command)
        if result.code != 0:
            return result.code, result.error_line
        lines = result.stdout.decode("utf-8", "replace").strip().splitlines()
        return 0, lines[-1] if lines else "ok"

    try:
        results = await asyncio.gather(*(one(h) for h in hosts))
    finally:
        await ssh.close(hosts)
    return {h.name: r for h, r in zip(hosts, results)}


async def cleanup_hosts(hosts: list[Host], ssh: SSH) -> dict[str, tuple[int, str]]:
    """Stop roost's own stray processes on every host, by their recorded process ids."""

    async def one(host: Host) -> tuple[int, str]:
        result = await ssh.run(host, python_command(remote.CLEANUP))
        if result.code != 0:
            return result.code, result.error_line
        info = json.loads(result.stdout.decode().strip().splitlines()[-1])
        return 0, f"stopped {len(info['stopped'])} process(es)"

    try:
        results = await asyncio.gather(*(one(h) for h in hosts))
    finally:
        await ssh.close(hosts)
    return {h.name: r for h, r in zip(hosts, results)}
