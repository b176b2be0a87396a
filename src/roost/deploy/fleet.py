"""``roost deploy SRC --hosts FILE --dest DEST``: an agentless, peer-to-peer fleet deploy.

Phases, each host independently and at most ``concurrency`` hosts at a time:

1. **Bootstrap.** A probe (``python3 -c``) reports the host's Python and
   whether it caches this exact runtime zipapp; only hosts that lack it are
   sent it, checked by hash on arrival.
2. **Distribute.** The controller runs a tracker (or uses ``--tracker``) and a
   seeder. Each host runs ``roost-runtime fetch`` over SSH; the manifest and
   the swarm secret travel on that command's stdin (SSH is the trust anchor;
   nothing secret touches the host's disk or argv), and progress comes back as
   JSON lines on its stdout. With ``--seeder HOST`` that host fetches first,
   alone; then the controller's seeder stops and the host is the others' source.
3. **Activate.** By default each host switches ``current`` as soon as it holds
   the verified release; ``--all-or-nothing`` switches every host only once
   all hold it, and none otherwise; then the ``--hook`` runs.
4. **Clean up.** Once every host holds the release or has failed, closing each
   peer's stdin ends it (it told the tracker goodbye); no temporary file is left
   on hosts. A failure of the controller's own side fails every unfinished host
   with the reason, so the report is always complete.
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
from roost.deploy.ssh import SSH, CommandResult, python_command, quote_path, runtime_command
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
    seeder: str | None = None  # --seeder HOST: one of ``hosts``, seeded first, then seeds the rest


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
    drains: list[asyncio.Task] = field(default_factory=list)

    def fail(self, host: Host, error: str) -> None:
        state = self.states[host.name]
        state.fail(error)
        self.reporter.update(state)


def find_seeder(plan: FleetPlan) -> Host | None:
    """The host ``--seeder`` names: one of the deploy's hosts (by name, address or target)."""
    if plan.seeder is None:
        return None
    for host in plan.hosts:
        if plan.seeder in (host.name, host.address, host.ssh_target):
            return host
    raise RoostError(f"--seeder {plan.seeder}: not one of the hosts being deployed to")


async def deploy_fleet(plan: FleetPlan, ssh: SSH, reporter: Reporter) -> list[HostState]:
    find_seeder(plan)  # a mistake there is reported before any work is done
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
    except (RoostError, OSError) as exc:
        # A failure of the controller's side (tracker, seeder): every unfinished host
        # fails with its reason, and the report still says exactly where each one is.
        reporter.phase(f"deploy aborted: {exc}")
        for host in plan.hosts:
            if fleet.states[host.name].state not in ("complete", "failed"):
                fleet.fail(host, f"deploy aborted: {exc}")
    finally:
        await _stop_fetches(fleet)
        await ssh.close(plan.hosts)
    for state in fleet.states.values():
        if state.state == "complete":
            state.state = "verified"  # each host checked every piece and the tree itself
        reporter.update(state)  # the final word on each host, for --json readers too
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
    if result.code == 255:  # ssh's own status: no connection, or it broke
        raise HostFailure(f"unreachable: {result.error_line}")
    if result.code == 127:
        raise HostFailure(f"no python3 on the host: {result.error_line}")
    if result.code != 0:
        raise HostFailure(f"the probe failed: {result.error_line}")
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
    """Run the swarm: our tracker (unless --tracker) and seeder, and a fetch on every host.

    With ``--seeder HOST`` that host fetches first, alone, from our seeder; then our
    seeder stops and the host, which keeps serving until the deploy ends, is the
    swarm's source for everyone else: our own uplink carries the release about once.
    """
    plan = fleet.plan
    secret = os.urandom(32)
    advertise = plan.advertise or fleet.probes[live[0].name].controller_address
    if not advertise:
        raise RoostError("cannot tell which address hosts reach this machine on: use --advertise")
    relay = find_seeder(plan)
    if relay is not None and relay not in live:
        fleet.reporter.phase(f"--seeder {relay.name} is unavailable: seeding from this machine")
        relay = None
    # A --seeder host turns seeder once complete, and the tracker counts no seeder's completion.
    expected = len(live) - (relay is not None)
    async with _tracker(plan, advertise, manifest, secret, expected) as tracker_url:
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
        await asyncio.sleep(0)  # the engine opens its listener before its first await
        if seeding.done() and seeding.exception() is not None:
            raise RoostError(f"cannot serve the release on {advertise}: {seeding.exception()}")
        try:
            if relay is not None:
                fleet.reporter.phase(f"seeding {relay.name}, which then seeds the others")
                await _fetch(fleet, relay, manifest, secret, tracker_url, limit, as_seeder=True)
                if fleet.states[relay.name].state == "complete":
                    await _stop_seeder(seeder, seeding)
                else:
                    fleet.reporter.phase(f"{relay.name} failed: seeding from this machine")
                live = [h for h in live if h != relay]
            fleet.reporter.phase("distributing")
            await asyncio.gather(
                *(_fetch(fleet, h, manifest, secret, tracker_url, limit) for h in live)
            )
            # Every host holds the release or has failed: nobody needs a peer any more.
            # Stopped while the tracker still runs, so their goodbyes are heard at once.
            await _stop_fetches(fleet)
        finally:
            failure = await _stop_seeder(seeder, seeding)
        if failure is not None:
            fleet.reporter.phase(f"this machine's seeder failed: {failure!r}")
        fleet.reporter.origin_uploaded(seeder.stats.uploaded)


async def _stop_seeder(seeder: Engine, seeding: asyncio.Task) -> BaseException | None:
    """Stop our seeder the orderly way (it tells the tracker it leaves), or cancel it if
    it hangs; returns what it failed with, if anything."""
    seeder.stop()
    if not seeding.done():
        done, _ = await asyncio.wait({seeding}, timeout=10)
        if not done:
            seeding.cancel()
            await asyncio.wait({seeding})
    return None if seeding.cancelled() else seeding.exception()


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
    *,
    as_seeder: bool = False,
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
    if as_seeder:
        args.append("--serve-as-seeder")  # then an origin for the others, until stdin closes
    command = runtime_command(probe.runtime, args)
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
                # The peer keeps serving until the deploy ends (stdin closes); what it
                # uploads meanwhile still counts.
                fleet.drains.append(asyncio.get_running_loop().create_task(_drain(process, state)))
                return
            fleet.reporter.update(state)
        code = await process.wait()
        errors = (await stderr).decode("utf-8", "replace").strip().splitlines()
        if state.state != "failed":
            if code == 255:  # ssh's own failure: the host or its sshd went away
                reason = "connection lost" + (f": {errors[-1]}" if errors else "")
            else:
                reason = errors[-1] if errors else f"exited with status {code}"
            fleet.fail(host, reason)


async def _drain(process: asyncio.subprocess.Process, state: HostState) -> None:
    """Read a complete peer's last events (its upload count) until it exits."""
    assert process.stdout is not None
    async for line in process.stdout:
        with contextlib.suppress(ValueError, AttributeError):
            uploaded = json.loads(line).get("uploaded")
            if isinstance(uploaded, int):
                state.uploaded = max(state.uploaded, uploaded)


async def _activate_all_or_nothing(
    fleet: _Fleet, manifest: Manifest, limit: asyncio.Semaphore
) -> None:
    """Switch every host, only once all hold the release; if a switch fails, the hosts
    already switched go back to the release they were on, so all or none run it."""
    states = fleet.states.values()
    if not all(s.state == "complete" for s in states):
        missing = [s.name for s in states if s.state != "complete"]
        fleet.reporter.phase(
            f"--all-or-nothing: not activating anywhere ({', '.join(missing)} not ready)"
        )
        return
    fleet.reporter.phase("activating every host")
    name = fleet.plan.tag or manifest.short_id
    link = quote_path(os.path.join(fleet.plan.dest, "current"))

    async def switch(host: Host, release: str, *, keep: int | None = None) -> CommandResult:
        args = ["activate", fleet.plan.dest, release]
        if keep is not None:
            args += ["--keep", str(keep)]
        command = runtime_command(fleet.probes[host.name].runtime, args)
        async with limit:  # what it replaces comes first, to switch back to if need be
            return await fleet.ssh.run(host, f'echo "was=$(readlink {link})"; exec {command}')

    async def activate(host: Host) -> str:
        result = await switch(host, name, keep=fleet.plan.keep)
        if result.code != 0:
            fleet.fail(host, f"activation failed: {result.error_line}")
            return ""
        fleet.states[host.name].activated = True
        fleet.reporter.update(fleet.states[host.name])
        was = result.stdout.decode("utf-8", "replace").partition("\n")[0]
        return os.path.basename(was.removeprefix("was="))

    hosts = fleet.plan.hosts
    previous = dict(zip((h.name for h in hosts), await asyncio.gather(*map(activate, hosts))))
    failed = [h.name for h in hosts if not fleet.states[h.name].activated]
    if not failed:
        return
    fleet.reporter.phase(
        f"--all-or-nothing: activation failed on {', '.join(failed)}: switching the others back"
    )

    async def revert(host: Host) -> None:
        state = fleet.states[host.name]
        if not previous[host.name]:
            fleet.fail(host, "switched, and no earlier release to switch back to")
            return
        result = await switch(host, previous[host.name])
        if result.code != 0:
            fleet.fail(host, f"switched, and switching back failed: {result.error_line}")
            return
        state.activated = False
        fleet.reporter.update(state)

    await asyncio.gather(*(revert(h) for h in hosts if fleet.states[h.name].activated))


async def _run_hook(fleet: _Fleet, host: Host, limit: asyncio.Semaphore) -> None:
    assert fleet.plan.hook
    current = quote_path(os.path.join(fleet.plan.dest, "current"))
    command = f"cd {current} && sh -c {shlex.quote(fleet.plan.hook)} 2>&1"
    async with limit:
        result = await fleet.ssh.run(host, command)
    state = fleet.states[host.name]
    tail = result.stdout.decode("utf-8", "replace").strip().splitlines()[-HOOK_TAIL_LINES:]
    if result.code == 255 and result.stderr.strip():  # ssh's failure or our timeout
        tail.append(result.error_line)
    state.hook = f"exit {result.code}" + (f": {tail[-1]}" if tail else "")
    if result.code != 0:
        fleet.fail(host, f"hook failed (exit {result.code}): {' | '.join(tail)}")
    else:
        fleet.reporter.update(state)


async def _stop_fetches(fleet: _Fleet) -> None:
    """Close every peer's stdin: the signal to stop serving and exit. Idempotent."""
    for process in fleet.fetches.values():
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()

    async def wait(name: str, process: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(process.wait(), 30)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            fleet.states[name].error = fleet.states[name].error or "peer did not stop in time"

    await asyncio.gather(*(wait(n, p) for n, p in fleet.fetches.items()))
    if fleet.drains:  # every peer has exited: their stdout ends now
        await asyncio.wait(fleet.drains, timeout=5)


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
            result = await ssh.run(host, runtime_command(probe.runtime, args))
        if result.code != 0:
            return result.code, result.error_line
        lines = result.stdout.decode("utf-8", "replace").strip().splitlines()
        return 0, lines[-1] if lines else "ok"

    try:
        results = await asyncio.gather(*(one(h) for h in hosts))
    finally:
        await ssh.close(hosts)
    return {h.name: r for h, r in zip(hosts, results)}


async def cleanup_hosts(
    hosts: list[Host], ssh: SSH, concurrency: int = 100
) -> dict[str, tuple[int, str]]:
    """Stop roost's own stray processes on every host, by their recorded process ids."""
    limit = asyncio.Semaphore(concurrency)

    async def one(host: Host) -> tuple[int, str]:
        async with limit:
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
