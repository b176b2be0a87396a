"""``roost deploy SRC --local N``: a whole fleet on this machine, over loopback.

The controller packs SRC, starts a tracker and a seeder in its own event loop,
and launches N separate peer processes (``python -m roost.runtime fetch``),
each with its own destination ``BASE/host-i``. Hosts report progress as JSON
lines on stdout; the controller shows them live, then checks every host's
``current`` against the manifest byte for byte before it reports success.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

from roost.deploy.report import HostState, Reporter
from roost.runtime import announce
from roost.runtime.manifest import Manifest
from roost.runtime.pack import pack
from roost.runtime.peer import Engine, EngineConfig, Pieces
from roost.runtime.swarm import write_secret
from roost.runtime.tree import verify_tree
from roost.tracker.service import running_tracker


@dataclass
class LocalDeploy:
    src: str
    hosts: int
    base: str
    tag: str | None = None
    piece_size: int | None = None
    linger: float = 30.0
    stall_timeout: float = 120.0
    keep: int | None = None
    extra_fetch_args: list[str] = field(default_factory=list)


async def deploy_local(plan: LocalDeploy, reporter: Reporter) -> list[HostState]:
    """Run the whole local deploy; return the final state of every host."""
    work = os.path.join(plan.base, ".roost-deploy")
    os.makedirs(work, exist_ok=True)
    reporter.phase(f"packing {plan.src}")
    manifest = await asyncio.get_running_loop().run_in_executor(
        None, lambda: pack(plan.src, piece_size=plan.piece_size)
    )
    manifest_path = os.path.join(work, f"{manifest.id}.manifest")
    with open(manifest_path, "wb") as f:
        f.write(manifest.to_bytes())
    secret_path = os.path.join(work, f"{manifest.id}.secret")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(secret_path)
    secret = write_secret(secret_path)
    hosts = [
        HostState(f"host-{i}", os.path.join(plan.base, f"host-{i}"))
        for i in range(1, plan.hosts + 1)
    ]
    reporter.start(manifest, hosts)
    async with running_tracker(os.path.join(work, "tracker.sqlite")) as tracker:
        key = announce.tracker_key(secret, manifest.id)
        await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: announce.register_swarm(
                tracker.url, tracker.admin_token, manifest.id, key, expected_peers=plan.hosts
            ),
        )
        seeder = Engine(
            manifest,
            Pieces(plan.src, manifest, complete=True),
            EngineConfig(secret=secret, tracker=tracker.url, seeder=True),
        )
        seeding = asyncio.get_running_loop().create_task(seeder.run())
        started = time.monotonic()
        try:
            await asyncio.gather(
                *(
                    _run_host(
                        plan, host, manifest_path, secret_path, tracker.url, started, reporter
                    )
                    for host in hosts
                )
            )
        finally:
            seeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await seeding
        reporter.origin_uploaded(seeder.stats.uploaded)
    reporter.phase("verifying every host against the manifest")
    await asyncio.get_running_loop().run_in_executor(None, _verify_hosts, hosts, manifest)
    return hosts


async def _run_host(
    plan: LocalDeploy,
    host: HostState,
    manifest_path: str,
    secret_path: str,
    tracker_url: str,
    started: float,
    reporter: Reporter,
) -> None:
    command = [
        sys.executable,
        "-m",
        "roost.runtime",
        "fetch",
        manifest_path,
        "--dest",
        host.dest,
        "--tracker",
        tracker_url,
        "--secret-file",
        secret_path,
        "--activate",
        "--events",
        "--linger",
        str(plan.linger),
        "--stall-timeout",
        str(plan.stall_timeout),
        *(["--tag", plan.tag] if plan.tag else []),
        *(["--keep", str(plan.keep)] if plan.keep is not None else []),
        *plan.extra_fetch_args,
    ]
    log_path = os.path.join(plan.base, ".roost-deploy", f"{host.name}.log")
    with open(log_path, "wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL
        )
        host.state = "running"
        reporter.update(host)
        assert process.stdout is not None
        async for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            host.apply(event, time.monotonic() - started)
            host.activated = host.completed_after is not None  # fetch runs with --activate
            reporter.update(host)
        code = await process.wait()
    if code != 0 and host.state != "failed":
        host.fail(_last_error(log_path) or f"exited with status {code}")
        reporter.update(host)
    elif code == 0 and host.completed_after is None:
        host.fail("exited without completing")
        reporter.update(host)


def _last_error(log_path: str) -> str | None:
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else None


def _verify_hosts(hosts: list[HostState], manifest: Manifest) -> None:
    for host in hosts:
        if host.state == "failed":
            continue
        current = os.path.join(host.dest, "current")
        problems = verify_tree(current, manifest) if os.path.isdir(current) else ["no current"]
        if problems:
            host.fail(f"verification failed: {problems[0]}")
        else:
            host.state = "verified"
